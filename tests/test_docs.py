"""The README and the docs pages as a reader follows them from a fresh clone: every link and picture is
there, every anchor names a heading, every Python block runs, and every ``python <script>`` command names a
script that takes the options given."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"(?m)^#+ (.*)$", page.read_text())}


def blocks(page: Path, language: str) -> list[str]:
    """The code blocks of ``language``, dedented (a block may sit in a list item)."""
    found = re.findall(rf"(?m)^( *)```{language}\n(.*?)^\1```", page.read_text(), flags=re.S)
    return [textwrap.dedent(code) for _, code in found]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_picture_is_there(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_the_readme_links_every_docs_page_and_the_licence_is_there():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    for page in (ROOT / "docs").glob("*.md"):
        assert page.resolve() in linked, f"the README does not link {page.name}"
    assert "Apache License" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written into the clone
    for code in blocks(page, "python"):
        exec(compile(code, f"<{page.name}>", "exec"), {})


def commands() -> dict[str, set[str]]:
    """Every script that a ``python <path>.py [--option ...]`` in the pages names, with the options given."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in re.findall(r"python3? ((?:examples|benchmarks|docs)/[\w/]+\.py[^`\n]*)", text):
            script, *words = line.split()
            found.setdefault(script, set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    return found


@pytest.mark.parametrize(("script", "options"), sorted(commands().items()), ids=lambda x: str(x))
def test_every_command_names_a_script_that_takes_its_options(script, options):
    path = ROOT / script
    assert path.exists(), f"{script} does not exist"
    if not options:
        return
    if script.startswith("examples/finetune"):
        # LightningCLI: dotted options of its config (run in test_examples.py)
        assert all(o.startswith(("--data.", "--model.", "--trainer.", "--help")) for o in options), options
        return
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for option in options - {"--help"}:
        assert option in done.stdout, f"{script} has no option {option}"
