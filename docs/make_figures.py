"""The README's and docs' pictures of the fine-tuning example, from the logs of a real run.

    python examples/finetune.py
    python docs/make_figures.py prism_logs/finetune/version_0

Writes into ``docs/``: ``evolution_digits.png`` (the run's evolution strip, as stored),
``embedding_digits.png`` (``prism/embedding`` before training, after the first and after the last epoch,
side by side) and ``prototypes_digits.png`` (``prism/prototypes`` before training and after the last
epoch, one above the other), each read back from the TensorBoard event files as TensorBoard serves them.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DOCS = Path(__file__).resolve().parent


def images(acc: EventAccumulator, tag: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB") for e in acc.Images(tag)]


def side_by_side(pictures: list[Image.Image], vertical: bool = False, gap: int = 8) -> Image.Image:
    widths, heights = [p.width for p in pictures], [p.height for p in pictures]
    if vertical:
        size = (max(widths), sum(heights) + gap * (len(pictures) - 1))
    else:
        size = (sum(widths) + gap * (len(pictures) - 1), max(heights))
    out = Image.new("RGB", size, "white")
    offset = 0
    for p in pictures:
        out.paste(p, (0, offset) if vertical else (offset, 0))
        offset += (p.height if vertical else p.width) + gap
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", type=Path, help="the example's logger directory (version_N)")
    args = parser.parse_args()
    acc = EventAccumulator(str(args.log_dir), size_guidance={"images": 0})
    acc.Reload()
    embedding = images(acc, "prism/embedding")
    side_by_side([embedding[0], embedding[1], embedding[-1]]).save(DOCS / "embedding_digits.png")
    if "prism/prototypes" in acc.Tags()["images"]:
        prototypes = images(acc, "prism/prototypes")
        side_by_side([prototypes[0], prototypes[-1]], vertical=True).save(DOCS / "prototypes_digits.png")
    shutil.copyfile(args.log_dir / "prism_evolution.png", DOCS / "evolution_digits.png")
    print(
        f"wrote {DOCS / 'embedding_digits.png'}, {DOCS / 'prototypes_digits.png'}, {DOCS / 'evolution_digits.png'}"
    )


if __name__ == "__main__":
    main()
