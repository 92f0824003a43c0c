from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_script import VALIDATION
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).with_name("ddp_script.py")


def fit(out_dir: Path, *options: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module", params=["ddp", "ddp_spawn"])
def plain(request, tmp_path_factory) -> tuple[Path, list[dict], list[str]]:
    """One DDP fit with the default view, shared by the tests, and the script's options for it;
    ddp_spawn pickles the Trainer with its callbacks (the monitor among them) into each process."""
    out_dir = tmp_path_factory.mktemp(request.param)
    options = ["spawn"] if request.param == "ddp_spawn" else []
    return out_dir, fit(out_dir, *options), options


def test_ddp_two_cpu_processes_same_probe_rank_zero_writes(plain):
    tmp_path, ranks, _ = plain
    assert ranks[0] == ranks[1]  # every rank has the same probe
    assert set(ranks[0]["indices"]) <= set(VALIDATION) and len(ranks[0]["indices"]) == 4
    event_files = list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert len(event_files) == 1  # only global rank zero writes
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    # 32 training images, batch 8, two processes: 2 steps per epoch; pictures at the step of each
    # epoch's validation loss.
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert steps == [1, 3]
    assert [e.step for e in acc.Images("prism/maps")] == [0, *steps]  # 0: before training
    # The PRISM pass failed on rank 1 at the end of the first epoch (ddp_script.py): no rank logged its
    # scalars then (rank zero alone logs those of the model before training, at step 0), and nobody
    # waited for a reduction that never came. The validation set's metrics, from the samples of both
    # ranks, were logged every epoch.
    assert [e.step for e in acc.Scalars("prism/explained_variance/pc1")] == [0, steps[1]]
    assert [e.step for e in acc.Scalars("prism/similarity/previous")] == steps[1:]
    for name in ("knn_accuracy", "class_separation", "effective_rank"):
        assert [e.step for e in acc.Scalars(f"prism/val/{name}")] == [0, *steps], name
    # Every rank logged them, so callbacks that monitor them work on every rank.
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    assert sorted(ranks[0]["callback_metrics"]) == [
        "prism/class_separation",
        "prism/explained_variance/pc1",
        "prism/explained_variance/pc2",
        "prism/explained_variance/pc3",
        "prism/similarity/first",
        "prism/similarity/previous",
        "prism/val/class_separation",
        "prism/val/effective_rank",
        "prism/val/knn_accuracy",
    ]
    # The validation set's metrics of two processes, each with half the samples, are those of one
    # process on all of them.
    for name, value in ranks[0]["one_process"].items():
        assert ranks[0]["callback_metrics"][name] == pytest.approx(value, abs=1e-5), name


def test_ddp_gradient_views_never_touch_training(tmp_path, plain):
    """Grad-CAM and saliency on every rank, on the LightningModule itself, and the class prototypes on
    global rank zero alone: the weights come out exactly as without them (no gradient reached DDP's
    reducer or the optimiser), rank zero logs them, and nobody waited for a collective."""
    with_views, without = fit(tmp_path / "views", "views", *plain[2]), plain[1]
    assert with_views[0]["weights_sum"] == with_views[1]["weights_sum"] == without[0]["weights_sum"]
    assert with_views[0]["grads"] == without[0]["grads"]
    acc = EventAccumulator(
        str(tmp_path / "views" / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0}
    )
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val_loss")]
    for view in ["maps", "grad_cam", "saliency", "views", "prototypes"]:
        assert [e.step for e in acc.Images(f"prism/{view}")] == [0, *steps], view
    # The prototypes: before training and in both epochs, on global rank zero alone.
    assert [rank["prototype_calls"] for rank in with_views] == [3, 0]
