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
    acc = EventAccumulator(str(event_files[0].parent), size_guidance={"images": 0})
    acc.Reload()
    # 32 training images, batch 8, two processes: 2 steps per epoch.
    assert [e.step for e in acc.Images("prism/maps")] == [2, 4]
