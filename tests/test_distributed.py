from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ddp_script import VALIDATION
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).with_name("ddp_script.py")


def test_ddp_two_cpu_processes_same_probe_rank_zero_writes(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
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
    assert [e.step for e in acc.Images("prism/maps")] == steps
    # The PRISM pass failed on rank 1 in the first epoch (ddp_script.py): no rank logged scalars
    # then, and afterwards only those that both ranks had (rank 1 has no previous epoch to compare
    # with); nobody waited for a reduction that never came.
    assert [e.step for e in acc.Scalars("prism/explained_variance/pc1")] == steps[1:]
    assert [e.step for e in acc.Scalars("prism/class_separation")] == steps[1:]
    assert "prism/similarity/previous" not in acc.Tags()["scalars"]
    # Every rank logged them, so callbacks that monitor them work on every rank.
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    assert sorted(ranks[0]["callback_metrics"]) == [
        "prism/class_separation",
        "prism/explained_variance/pc1",
        "prism/explained_variance/pc2",
        "prism/explained_variance/pc3",
    ]
