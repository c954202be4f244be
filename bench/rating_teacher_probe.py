"""Which rating teacher would make distillation pay on MovieLens-100k? (issue 22)

    python -m bench.rating_teacher_probe [--data ../shared/data/ml-100k] [--seeds 0 1]

A probe before building a new teacher architecture into the pipeline, as ``bench.rating_feature_probe``
was for side features. It runs in one process, outside Ray and DeepSpeed, on the benchmark's own split
(each user's time-ordered ratings; the last one is the test example, the one before it the validation
example) and asks: with the same student, the same loss (:func:`distill.rating.rating_terms`) and the
same selection on validation NLL, does a *different teacher* give the distilled student a test gain over
its twin whose paired-bootstrap interval excludes 0, where the pipeline's Transformer teacher does not?

Teachers:
- ``transformer``: the pipeline's own (``configs/ml100k-rating.yaml``'s teacher, :class:`RatingModel`),
  trained here the same way (Adam, lr 0.001, batch 64, early stopping on validation NLL), as the control;
- ``factorisation``: a biased matrix factorisation with a distribution head, ``s = mu + b_u + b_i + p_u.q_i``
  and ``MLP([p_u, q_i, p_u * q_i, s]) -> 5 logits``, fitted on every training rating. It keeps a vector
  *per user*, so it is transductive: it cannot score a user it was not fitted on, which a teacher never
  has to. Its label for a training position is informed by the user's whole training history, later
  ratings included (privileged information the student, which reads only the past, cannot have);
- ``mixture``: the two as an ensemble (the mixture of their distributions, as ``teacher.ensemble`` labels).

Students are the config's (d_model 8, 16k parameters): a twin (hard labels only) and distilled students
at (alpha, T) = (0.2, 1) and (0.5, 2), the better on validation NLL kept. Writes
bench/results/rating_teacher_probe_ml100k[_NAME].json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.rating_feature_probe import position_from_end
from cluster.common import code_version
from distill.config import ModelConfig
from distill.metrics import paired_bootstrap_delta
from distill.rating import per_example_errors, rating_terms
from distill.rating_model import RatingModel
from distill.training import mixed_loss

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = ModelConfig(d_model=64, num_layers=2, num_heads=2, ffn_dim=256, max_len=200, dropout=0.2)
STUDENT = ModelConfig(d_model=8, num_layers=1, num_heads=1, ffn_dim=32, max_len=200, dropout=0.1)
VALUES = torch.arange(1, 6, dtype=torch.float64)
KD_SETTINGS = [(0.2, 1.0), (0.5, 2.0)]
FACTORISATION_GRID = [(8, 0.03), (8, 0.1), (32, 0.1)]  # (dim, L2 strength per example)


class Split:
    """Left-padded (items, levels) windows of at most ``width`` pairs with each row's user, plus targets."""

    def __init__(self, sequences, users, width, target_items=None, target_levels=None):
        self.items = torch.zeros(len(sequences), width, dtype=torch.long)
        self.levels = torch.zeros_like(self.items)
        for row, (items, levels) in enumerate(sequences):
            items, levels = items[-width:], levels[-width:]
            self.items[row, width - len(items):] = torch.from_numpy(items)
            self.levels[row, width - len(levels):] = torch.from_numpy(levels)
        self.users = torch.as_tensor(users)
        self.target_items = None if target_items is None else torch.as_tensor(target_items)
        self.target_levels = None if target_levels is None else torch.as_tensor(target_levels) - 1  # 0..4


def load_splits(folder: Path):
    ratings = np.loadtxt(folder / "u.data", dtype=np.int64)  # user, item, rating, time
    ratings = ratings[np.lexsort((np.arange(len(ratings)), ratings[:, 3], ratings[:, 0]))]
    back = position_from_end(ratings[:, 0])
    users, starts = np.unique(ratings[:, 0], return_index=True)  # rows are grouped by user
    seqs = [(rows[:, 1], rows[:, 2]) for rows in np.split(ratings, starts[1:])]
    train = Split([(i[:-2], r[:-2]) for i, r in seqs], users, TEACHER.max_len + 1)
    valid = Split([(i[:-2], r[:-2]) for i, r in seqs], users, TEACHER.max_len, [i[-2] for i, _ in seqs], [r[-2] for _, r in seqs])
    test = Split([(i[:-1], r[:-1]) for i, r in seqs], users, TEACHER.max_len, [i[-1] for i, _ in seqs], [r[-1] for _, r in seqs])
    return ratings[back >= 2], train, valid, test, int(users.max()) + 1, int(ratings[:, 1].max()) + 1


class FactorisationRating(nn.Module):
    """Biased MF with a distribution head (see the module docstring)."""

    def __init__(self, num_users: int, num_items: int, dim: int, mean: float):
        super().__init__()
        self.p, self.q = nn.Embedding(num_users, dim), nn.Embedding(num_items, dim)
        self.bu, self.bi = nn.Embedding(num_users, 1), nn.Embedding(num_items, 1)
        for table, std in ((self.p, 0.01), (self.q, 0.01), (self.bu, 0.0), (self.bi, 0.0)):
            nn.init.normal_(table.weight, std=std) if std else nn.init.zeros_(table.weight)
        self.mean = mean
        self.head = nn.Sequential(nn.Linear(3 * dim + 1, 32), nn.GELU(), nn.Linear(32, 5))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (..., 5), the L2 penalty of the rows used, per example)."""
        p, q, bu, bi = self.p(users), self.q(items), self.bu(users).squeeze(-1), self.bi(items).squeeze(-1)
        s = self.mean + bu + bi + (p * q).sum(-1)
        penalty = p.square().sum(-1) + q.square().sum(-1) + bu.square() + bi.square()
        return self.head(torch.cat([p, q, p * q, s.unsqueeze(-1)], -1)), penalty


def split_nll(log_probs: torch.Tensor, split: Split) -> float:
    return float(-log_probs.gather(1, split.target_levels[:, None]).mean())


def early_stopped(model: nn.Module, lr: float, batches, loss_of, valid_nll, epochs: int, patience: int) -> tuple[float, int]:
    """Adam on ``loss_of(batch)`` for each of ``batches()`` per epoch, stopped after ``patience`` epochs without a
    better ``valid_nll()``; the model is left at its best state, in eval mode. -> (best validation NLL, epochs run)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    for epoch in range(epochs):
        model.train()
        for batch in batches():
            loss = loss_of(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        nll = valid_nll()
        if nll < best:
            best, best_state, bad = nll, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return best, epoch + 1


def fit_factorisation(train_rows, valid: Split, num_users, num_items, dim, strength, seed, epochs=60, patience=5):
    torch.manual_seed(seed)
    model = FactorisationRating(num_users, num_items, dim, float(train_rows[:, 2].mean()))
    users, items = torch.from_numpy(train_rows[:, 0]), torch.from_numpy(train_rows[:, 1])
    targets = torch.from_numpy(train_rows[:, 2] - 1)

    def loss_of(batch):
        logits, penalty = model(users[batch], items[batch])
        return F.cross_entropy(logits, targets[batch]) + strength * penalty.mean()

    best, _ = early_stopped(model, 0.01, lambda: torch.randperm(len(targets)).split(1024), loss_of,
                            lambda: split_nll(split_log_probs(model, valid, users_model=True), valid), epochs, patience)
    return model, best


def factorisation_labels(model: FactorisationRating, train: Split) -> torch.Tensor:
    """(B, W-1, 5) log-probabilities of each training position's rating (position t: the pair at t + 1)."""
    with torch.no_grad():
        users = train.users[:, None].expand(-1, train.items.shape[1] - 1)
        return torch.log_softmax(model(users, train.items[:, 1:])[0], -1)


def split_log_probs(model, split: Split, users_model: bool = False) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if users_model:
            return torch.log_softmax(model(split.users, split.target_items)[0], -1)
        return torch.log_softmax(model.predict(split.items, split.levels, split.target_items), -1)


def fit_sequence_model(cfg, train: Split, valid: Split, num_items, lr, seed, labels=None, alpha=1.0, temperature=1.0,
                       epochs=30, patience=5):
    """A RatingModel trained on the windows (hard labels, or rating_terms against ``labels``), kept at its best
    validation NLL. -> (model, best validation NLL, epochs run)."""
    torch.manual_seed(seed)
    model = RatingModel(cfg, num_items, 5)

    def loss_of(batch):
        logits, targets, valid_pos = model.sequence_logits(train.items[batch], train.levels[batch])
        teacher = None if labels is None else labels[batch][valid_pos]
        terms = rating_terms(logits[valid_pos], targets[valid_pos], teacher, alpha, temperature)
        return mixed_loss(terms, alpha, world=1, device=logits.device)[0]

    best, epochs_run = early_stopped(model, lr, lambda: torch.randperm(len(train.items)).split(64), loss_of,
                                     lambda: split_nll(split_log_probs(model, valid), valid), epochs, patience)
    return model, best, epochs_run


def test_errors(log_probs: torch.Tensor, test: Split) -> dict[str, np.ndarray]:
    errors = per_example_errors(log_probs.exp(), test.target_levels, VALUES)
    return {k: v.numpy() for k, v in errors.items()}


def summary(errors: dict[str, np.ndarray]) -> dict[str, float]:
    return {"rmse": float(np.sqrt(errors["squared_error"].mean())), "nll": float(errors["nll"].mean()),
            "accuracy": float(errors["correct"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/ml-100k", help="folder with u.data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (each: a twin and distilled students)")
    parser.add_argument("--student-epochs", type=int, default=30, help="most epochs of every student, twin and distilled alike "
                        "(each stops after 5 without a better validation NLL)")
    parser.add_argument("--name", default="", help="suffix of the results file: rating_teacher_probe_ml100k_NAME.json")
    args = parser.parse_args()
    folder = Path(args.data)
    if not (folder / "u.data").is_file():
        raise SystemExit(f"rating_teacher_probe: u.data not found in {folder} (MovieLens-100k)")
    started = time.perf_counter()
    train_rows, train, valid, test, num_users, num_items = load_splits(folder)
    result = {"benchmark": "rating_teacher_probe", "dataset": "ml-100k", "test_examples": len(test.target_items),
              "student_epochs": args.student_epochs,
              **code_version(), "teachers": {}, "students": {}, "comparisons": {}}
    labels, test_err, log_probs = {}, {}, {}  # log_probs[teacher][split name]: (N, 5) on valid and test

    # Teachers, each selected on validation NLL.
    candidates = []
    for dim, strength in FACTORISATION_GRID:
        model, nll = fit_factorisation(train_rows, valid, num_users, num_items, dim, strength, seed=0)
        candidates.append((nll, dim, strength, model))
        print(f"factorisation dim {dim} L2 {strength}: valid NLL {nll:.4f}", flush=True)
    nll, dim, strength, mf = min(candidates, key=lambda c: c[0])
    labels["factorisation"] = factorisation_labels(mf, train)
    log_probs["factorisation"] = {name: split_log_probs(mf, split, users_model=True) for name, split in (("valid", valid), ("test", test))}
    test_err["factorisation"] = test_errors(log_probs["factorisation"]["test"], test)
    result["teachers"]["factorisation"] = {"dim": dim, "l2": strength, "valid_nll": nll, "params": sum(p.numel() for p in mf.parameters()),
                                           "grid": [{"dim": d, "l2": s, "valid_nll": n} for n, d, s, _ in candidates],
                                           "test": summary(test_err["factorisation"])}
    transformer, nll, epochs = fit_sequence_model(TEACHER, train, valid, num_items, lr=0.001, seed=0)
    with torch.no_grad():
        logits, _, _ = transformer.sequence_logits(train.items, train.levels)
        labels["transformer"] = torch.log_softmax(logits, -1)
    log_probs["transformer"] = {name: split_log_probs(transformer, split) for name, split in (("valid", valid), ("test", test))}
    test_err["transformer"] = test_errors(log_probs["transformer"]["test"], test)
    result["teachers"]["transformer"] = {"valid_nll": nll, "epochs": epochs, "params": sum(p.numel() for p in transformer.parameters()),
                                         "test": summary(test_err["transformer"])}
    # The two as an ensemble: the mixture of their distributions (what teacher.ensemble labels with).
    mixture = lambda a, b: torch.logaddexp(a, b) - np.log(2.0)  # noqa: E731
    labels["mixture"] = mixture(labels["factorisation"], labels["transformer"])
    log_probs["mixture"] = {name: mixture(log_probs["factorisation"][name], log_probs["transformer"][name]) for name in ("valid", "test")}
    test_err["mixture"] = test_errors(log_probs["mixture"]["test"], test)
    result["teachers"]["mixture"] = {"valid_nll": split_nll(log_probs["mixture"]["valid"], valid), "params": result["teachers"]["factorisation"]["params"]
                                     + result["teachers"]["transformer"]["params"], "test": summary(test_err["mixture"])}
    for name, t in result["teachers"].items():
        print(f"teacher {name}: {t['params']:,} params, valid NLL {t['valid_nll']:.4f}, test {t['test']}", flush=True)

    # Students: a twin and the distilled students of each teacher, per seed.
    for seed in args.seeds:
        twin, twin_nll, twin_epochs = fit_sequence_model(STUDENT, train, valid, num_items, lr=0.003, seed=seed,
                                                         epochs=args.student_epochs)
        twin_err = test_errors(split_log_probs(twin, test), test)
        result["students"][f"twin seed {seed}"] = {"valid_nll": twin_nll, "epochs": twin_epochs, "test": summary(twin_err)}
        print(f"twin seed {seed}: valid NLL {twin_nll:.4f}, test {summary(twin_err)}", flush=True)
        for teacher_name, teacher_labels in labels.items():
            runs = []
            for alpha, temperature in KD_SETTINGS:
                model, nll, ep = fit_sequence_model(STUDENT, train, valid, num_items, lr=0.003, seed=seed, labels=teacher_labels,
                                                    alpha=alpha, temperature=temperature, epochs=args.student_epochs)
                runs.append((nll, alpha, temperature, ep, model))
                print(f"  {teacher_name} alpha {alpha} T {temperature} seed {seed}: valid NLL {nll:.4f}", flush=True)
            nll, alpha, temperature, ep, model = min(runs, key=lambda r: r[0])
            err = test_errors(split_log_probs(model, test), test)
            key = f"distilled from {teacher_name} seed {seed}"
            result["students"][key] = {"alpha": alpha, "temperature": temperature, "valid_nll": nll, "epochs": ep,
                                       "valid_nll_all": [{"alpha": a, "temperature": t, "valid_nll": n} for n, a, t, _, _ in runs],
                                       "test": summary(err)}
            result["comparisons"][f"{key} - twin"] = {
                "rmse": paired_bootstrap_delta(err["squared_error"], twin_err["squared_error"], statistic="rmse"),
                "nll": paired_bootstrap_delta(err["nll"], twin_err["nll"]),
                "accuracy": paired_bootstrap_delta(err["correct"], twin_err["correct"])}
    result["params"] = {"student": sum(p.numel() for p in twin.parameters())}
    result["seconds"] = time.perf_counter() - started

    print(f"\n{'comparison':<44} {'RMSE (95% CI)':>30} {'NLL (95% CI)':>30}")
    for name, c in result["comparisons"].items():
        cell = lambda d: f"{d['delta']:+.4f} ({d['ci95_low']:+.4f} .. {d['ci95_high']:+.4f})"  # noqa: E731
        print(f"{name:<44} {cell(c['rmse']):>30} {cell(c['nll']):>30}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rating_teacher_probe_ml100k{'_' + args.name if args.name else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
