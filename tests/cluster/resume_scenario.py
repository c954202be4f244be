"""One student training in this process, under the in-process engine, optionally SIGKILLed mid-epoch.

Run by test_resume.py as ``python resume_scenario.py RUN_DIR CHECKPOINTS KILL_AT_STEP [override ...]``:
trains the baseline student of RUN_DIR (already prepared) with its checkpoints under
CHECKPOINTS; with KILL_AT_STEP > 0 the process SIGKILLs itself inside the optimiser step
that many steps in (a real kill: no cleanup, no exception handlers, mid-way between two
checkpoints), so that a second run has to resume from what was committed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root

import torch  # noqa: E402

from cluster.config import build_config  # noqa: E402
from cluster.distill import train_student_worker  # noqa: E402
from cluster.engine import InProcessContext  # noqa: E402


def main() -> None:
    run_dir, checkpoints, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = build_config({}, [f"run.run_dir={run_dir}", *sys.argv[4:]])
    # One intra-op thread, as Ray Train runs its workers (OMP_NUM_THREADS=1). A CPU reduction's bits depend
    # on how many threads split it, so "bit-identical" holds for a fixed team; with the default team (the
    # cores) one CI run under heavy load saw the two runs differ, which never reproduced since.
    torch.set_num_threads(1)
    if kill_at > 0:
        step = torch.optim.AdamW.step
        calls = [0]

        def step_then_die(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args, **kwargs)

        torch.optim.AdamW.step = step_then_die
    loop_config = {"config": cfg.to_dict(), "baseline": True, "soft_manifest": None, "teacher_url": None}
    train_student_worker(loop_config, InProcessContext(checkpoints))


if __name__ == "__main__":
    main()
