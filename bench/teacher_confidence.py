"""What the stored soft labels carry beyond the hard label (issue 5 diagnostic).

    python -m bench.teacher_confidence --config configs/ml1m.yaml [--name NAME] [overrides...]

The teacher's fit on the positions it labelled for the student (every training position,
read back from the soft-label store) against its fit on held-out targets (the validation
and test items, the teacher run on those users' histories). For each: the teacher's mean
probability of the true next item, how often that item is its top-1 and inside its top-k,
the probability mass its top-k hold, and the entropy of the top-k distribution the
student is taught (renormalised, T = 1). All unfiltered (seen items not removed: the
training labels are not filtered either). A teacher that is much surer of its training
positions than of held-out ones hands the student labels close to the one-hot targets
there: less to distil than its test quality suggests. Writes
bench/results/teacher_confidence_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from cluster.common import teacher_url
from data_pipeline import soft_labels as store
from data_pipeline.dataset import load_manifest, read_split
from data_pipeline.layout import RunLayout
from cluster.config import load_config
from distill.evaluate import left_pad_list_array
from data_pipeline.exports import check_export_fits_dataset
from cluster.models import load_model


class FitStats:
    """Running sums of the per-position statistics (one target, k stored logits, the log-normaliser)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = {"p_target": 0.0, "top1": 0.0, "in_topk": 0.0, "topk_mass": 0.0, "topk_entropy": 0.0}

    def add(self, targets: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor, lse: torch.Tensor,
            p_target: torch.Tensor) -> None:
        """``p_target``: the teacher's probability of each target (full softmax; 0 where unknown)."""
        log_p = topk_logits - lse[:, None]  # (P, k) log-probabilities of the top-k items
        renormalised = torch.log_softmax(topk_logits, dim=-1)
        hit = topk_ids == targets[:, None]
        self.n += len(targets)
        self.sums["p_target"] += float(p_target.sum())
        self.sums["top1"] += float(hit[:, 0].sum())
        self.sums["in_topk"] += float(hit.any(dim=1).sum())
        self.sums["topk_mass"] += float(log_p.exp().sum())
        self.sums["topk_entropy"] += float(-(renormalised.exp() * renormalised).sum())

    def result(self) -> dict:
        return {"positions": self.n, **{f"mean_{k}": v / max(self.n, 1) for k, v in self.sums.items()}}


def training_positions(cfg) -> dict:
    """Statistics of every position in the soft-label store (what the distilled student is taught)."""
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    manifest = store.load_store_manifest(layout.soft_labels, storage)
    spec = store.manifest_spec(manifest)
    stats = FitStats()
    first_augmented = (manifest.get("augmentation") or {}).get("first_seq")
    for shard in manifest["shards"]:
        if first_augmented is not None and shard["first_seq"] >= first_augmented:
            continue  # teacher-labelled augmented rows have no target to be confident about
        table = store.read_shard(layout.soft_labels, manifest, shard["index"], storage)
        soft = store.decode_positions(table, spec)
        targets = torch.from_numpy(table.column("targets").combine_chunks().values.to_numpy().astype(np.int64))
        if len(targets) != len(soft["lse"]):
            raise ValueError(f"shard {shard['file']}: {len(targets)} targets for {len(soft['lse'])} labelled positions")
        hit = soft["topk_ids"] == targets[:, None]
        # The store keeps the top-k logits only: a target outside them counts 0 (a lower bound, as below).
        p_target = torch.where(hit, (soft["topk_logits"] - soft["lse"][:, None]).exp(), 0.0).sum(dim=1)
        stats.add(targets, soft["topk_ids"], soft["topk_logits"], soft["lse"], p_target)
    return {**stats.result(), "k": spec.k}


def held_out(cfg, split: str, k: int, batch_size: int = 256) -> dict:
    """The same statistics for the ``split`` targets, the teacher scoring each user's history."""
    layout, storage = RunLayout(cfg.run.run_dir), cfg.data.storage_options
    dataset = load_manifest(layout.data, storage)
    teacher, meta = load_model(teacher_url(cfg), storage)
    check_export_fits_dataset(meta, dataset, teacher_url(cfg))
    table = read_split(layout.data, split, storage, dataset)
    stats, exact = FitStats(), 0.0
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        histories = torch.from_numpy(left_pad_list_array(chunk.column("history")))[:, -teacher.cfg.max_len:]
        targets = torch.from_numpy(chunk.column("target").to_numpy().astype(np.int64))
        with torch.no_grad():
            logits = teacher.score_last(histories)[:, 1:].float()  # column 0 is padding
        lse = torch.logsumexp(logits, dim=-1)
        values, columns = logits.topk(k, dim=-1)
        ids = columns + 1
        p_full = (logits.gather(1, (targets - 1)[:, None]).squeeze(1) - lse).exp()
        exact += float(p_full.sum())
        stats.add(targets, ids, values, lse, torch.where((ids == targets[:, None]).any(dim=1), p_full, 0.0))
    return {**stats.result(), "mean_p_target_full_softmax": exact / max(table.num_rows, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    torch.set_num_threads(2)
    train = training_positions(cfg)
    result = {
        "benchmark": "teacher_confidence",
        "config": args.config,
        "overrides": args.overrides,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "teacher": teacher_url(cfg),
        "teacher_fingerprint": store.load_store_manifest(RunLayout(cfg.run.run_dir).soft_labels,
                                                         cfg.data.storage_options)["teacher_fingerprint"],
        "note": "mean_p_target counts 0 for a target outside the teacher's top-k (the store keeps no more), in every row",
        "train_positions": train,
        "valid": held_out(cfg, "valid", train["k"]),
        "test": held_out(cfg, "test", train["k"]),
    }
    out = Path("bench/results") / f"teacher_confidence_{args.name or Path(args.config).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    columns = ("mean_p_target", "mean_top1", "mean_in_topk", "mean_topk_mass", "mean_topk_entropy")
    print(f"{'positions':<28}" + "".join(f"{c.removeprefix('mean_'):>14}" for c in columns))
    for name in ("train_positions", "valid", "test"):
        r = result[name]
        print(f"{name + ' (' + format(r['positions'], ',') + ')':<28}" + "".join(f"{r[c]:>14.4f}" for c in columns))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
