"""Time of one distilled student's training step, this checkout against another commit, side by side.

    python -m bench.student_step --against 5e56b5b [--repeats 5] [--steps 10]

The step is the one `distill` runs (``PositionLogits`` forward, ``distillation_terms``, ``mixed_loss``,
backward, AdamW) on synthetic batches of ML-1M's shapes: 3,416 items, the 1/10 student of
configs/ml1m.yaml (d_model 48, banded item table), 16 rows of up to 200 positions, top-128 soft labels,
one thread (as a Ray Train worker has). Each repeat times both trees in fresh processes, alternating
which goes first, so the machine's drift hits both alike; the ratio is of the medians. The other
commit is checked out with ``git worktree`` into a temporary folder and removed afterwards.
Writes bench/results/student_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Runs inside the tree being timed (its own distill package): prints seconds per step.
STEP = r"""
import sys, time, torch
from distill.config import ItemDimBand, ModelConfig
from distill.losses import distillation_terms
from distill.model import SequentialRecommender
from distill.training import PositionLogits, mixed_loss
torch.set_num_threads(1)
torch.manual_seed(0)
items, rows, length, k, steps = 3416, 16, 200, 128, int(sys.argv[1])
cfg = ModelConfig(d_model=48, num_layers=1, num_heads=2, ffn_dim=96, max_len=length, dropout=0.1,
                  item_dims=[ItemDimBand(items=400, dim=48), ItemDimBand(items=1000, dim=16), ItemDimBand(dim=8)])
model = SequentialRecommender(cfg, items)
forward, optimizer = PositionLogits(model), torch.optim.AdamW(model.parameters())
batches = []
for _ in range(4):
    seq = torch.zeros(rows, length + 1, dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(20, length + 1, ()))
        seq[r, -n:] = torch.randint(1, items + 1, (n,))
    inputs, targets = seq[:, :-1], seq[:, 1:]
    p = int((inputs != 0).sum())
    soft = {"topk_ids": torch.rand(p, items).argsort(dim=1)[:, :k] + 1,
            "topk_logits": torch.randn(p, k).sort(dim=1, descending=True).values + 5.0, "lse": torch.full((p,), 12.0)}
    batches.append((inputs, targets[inputs != 0], soft))
def step(i):
    inputs, targets, soft = batches[i % len(batches)]
    terms = distillation_terms("kl_topk_tail", 0.5, 1.0, forward(inputs), targets, soft, None)
    loss, _ = mixed_loss(terms, 0.5, 1, "cpu", 0.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for i in range(3):
    step(i)
started = time.perf_counter()
for i in range(steps):
    step(i)
print((time.perf_counter() - started) / steps)
"""


def time_tree(tree: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STEP, str(steps)], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"student_step: the step failed in {tree}:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit to compare with (e.g. the one before a change)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    try:
        against, head = git("rev-parse", "--short", args.against), git("rev-parse", "--short", "HEAD")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"student_step: {exc.stderr.strip()}") from None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    times: dict[str, list[float]] = {"this checkout": [], against: []}
    with tempfile.TemporaryDirectory(prefix="recdistill-step-") as tmp:
        other = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(other), against)
        try:
            for repeat in range(args.repeats):
                order = [("this checkout", ROOT), (against, other)]
                for name, tree in order if repeat % 2 == 0 else order[::-1]:
                    times[name].append(time_tree(tree, args.steps))
        finally:
            git("worktree", "remove", "--force", str(other))
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratio = medians[against] / medians["this checkout"]
    print(f"{'tree':<16} {'median s/step':>14}  per repeat")
    for name, values in times.items():
        print(f"{name:<16} {medians[name]:>14.4f}  {', '.join(f'{v:.4f}' for v in values)}")
    print(f"{against} / this checkout: {ratio:.2f}x")
    result = {"benchmark": "student_step", "head": head + ("+changes" if dirty else ""), "against": against,
              "shape": "ML-1M 1/10 student (d_model 48, banded table), 16 rows x <=200 positions, 3,416 items, top-128 kl_topk_tail",
              "threads": 1, "steps_per_repeat": args.steps, "seconds_per_step": times, "median": medians,
              "speedup": ratio, "cpus": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "student_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS / 'student_step.json'}")


if __name__ == "__main__":
    main()
