"""Do MovieLens-100k's side features predict a user's next rating beyond what their history does? (issue 22)

    python -m bench.rating_feature_probe [--data ../shared/data/ml-100k]

A cheap probe before building side features into the rating teacher: a ridge regression on
leak-free statistics, with and without the features, on the benchmark's own split (each user's
time-ordered ratings, the last one the test example, the one before it the validation example).

- history only: intercept, the user's and the item's shrunk mean offsets, log of the item's
  rating count;
- with side features: those plus u.item's 19 genre flags, u.user's age, gender and occupation,
  and the user's shrunk mean offset on the target's genres (the user-genre affinity, a statistic of
  the history that the genres make possible); each group is also added alone.

The weights are fitted on each user's last 10 training ratings, with the statistics taken from
the ratings before them; validation and test use statistics from every training rating. The
ridge strength is chosen on validation RMSE; test RMSE is reported with a paired-bootstrap 95%
interval of the difference. Writes bench/results/rating_feature_probe_ml100k.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cluster.common import code_version
from distill.metrics import paired_bootstrap_delta

RESULTS = Path(__file__).resolve().parent / "results"
FIT_PER_USER = 10  # training ratings per user that the weights are fitted on
SHRINK = 5.0  # pseudo-counts pulling each mean offset towards 0


def load(folder: Path):
    ratings = np.loadtxt(folder / "u.data", dtype=np.int64)  # user, item, rating, time
    order = np.lexsort((np.arange(len(ratings)), ratings[:, 3], ratings[:, 0]))  # by user, then time, then file order
    ratings = ratings[order]
    genres, users = {}, {}
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        genres[int(parts[0])] = np.array(parts[5:24], dtype=np.float64)
    for line in (folder / "u.user").read_text(encoding="latin-1").splitlines():
        uid, age, gender, occupation, _zip = line.split("|")
        users[int(uid)] = (float(age), gender == "M", occupation)
    return ratings, genres, users


def position_from_end(users: np.ndarray) -> np.ndarray:
    """0 for each user's last rating, 1 for the one before it, ... (rows sorted by user, then time)."""
    counts = np.bincount(users)
    ends = np.cumsum(counts)[users]
    return ends - 1 - np.arange(len(users))


class Statistics:
    """Shrunk mean offsets from a set of ratings: per user, per item, per (user, genre); item counts."""

    def __init__(self, rows: np.ndarray, genres: dict[int, np.ndarray]):
        self.mean = rows[:, 2].mean()
        self.genres = genres
        by_user, by_item = defaultdict(list), defaultdict(list)
        for u, i, r, _t in rows:
            by_user[u].append(r - self.mean)
        self.user = {u: sum(v) / (len(v) + SHRINK) for u, v in by_user.items()}
        for u, i, r, _t in rows:
            by_item[i].append(r - self.mean - self.user[u])
        self.item = {i: sum(v) / (len(v) + SHRINK) for i, v in by_item.items()}
        self.count = {i: len(v) for i, v in by_item.items()}
        residual_sum, genre_count = defaultdict(lambda: np.zeros(19)), defaultdict(lambda: np.zeros(19))
        for u, i, r, _t in rows:
            residual = r - self.mean - self.user[u] - self.item[i]
            residual_sum[u] += genres[i] * residual
            genre_count[u] += genres[i]
        self.affinity = {u: residual_sum[u] / (genre_count[u] + SHRINK) for u in residual_sum}


def features(rows: np.ndarray, stats: Statistics, users: dict, occupations: list[str]) -> np.ndarray:
    """Columns: 4 history statistics, 19 genres, age, gender, one per occupation, the user-genre affinity."""
    out = []
    for u, i, _r, _t in rows:
        g = stats.genres[i]
        age, male, occupation = users[u]
        affinity = stats.affinity.get(u, np.zeros(19))
        out.append([1.0, stats.user.get(u, 0.0), stats.item.get(i, 0.0), np.log1p(stats.count.get(i, 0)),
                    *g, (age - 30.0) / 10.0, float(male), *(float(occupation == o) for o in occupations),
                    float(affinity @ g / max(g.sum(), 1.0))])
    return np.asarray(out)


def ridge(x: np.ndarray, y: np.ndarray, strength: float) -> np.ndarray:
    penalty = strength * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(x.T @ x + penalty, x.T @ y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/ml-100k", help="folder with u.data, u.item, u.user")
    args = parser.parse_args()
    folder = Path(args.data)
    missing = [name for name in ("u.data", "u.item", "u.user") if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"rating_feature_probe: {', '.join(missing)} not found in {folder} (MovieLens-100k)")
    ratings, genres, users = load(folder)
    back = position_from_end(ratings[:, 0])
    test, valid, train = ratings[back == 0], ratings[back == 1], ratings[back >= 2]
    fit, early = ratings[(back >= 2) & (back < 2 + FIT_PER_USER)], ratings[back >= 2 + FIT_PER_USER]
    occupations = sorted({o for _a, _g, o in users.values()})
    fit_stats, all_stats = Statistics(early, genres), Statistics(train, genres)
    strengths = [0.1, 1.0, 10.0, 100.0, 1000.0]
    result = {"benchmark": "rating_feature_probe", "dataset": "ml-100k", "test_examples": len(test),
              "fit_examples": len(fit), **code_version(), "models": {}}
    x_fit = features(fit, fit_stats, users, occupations)
    x_valid = features(valid, all_stats, users, occupations)
    x_test = features(test, all_stats, users, occupations)
    # Column groups of the feature matrix (see features()): which side information carries the signal.
    history = list(range(4))
    genre, people, affinity = list(range(4, 23)), list(range(23, 25 + len(occupations))), [x_fit.shape[1] - 1]
    models = {"history only": history, "+ item genres": history + genre, "+ age, gender, occupation": history + people,
              "+ user-genre affinity": history + affinity, "with side features": list(range(x_fit.shape[1]))}
    rmse = lambda w, x, rows: float(np.sqrt(np.mean((np.clip(x @ w, 1, 5) - rows[:, 2]) ** 2)))  # noqa: E731
    squared = {}
    for name, columns in models.items():
        fit_x, valid_x, test_x = x_fit[:, columns], x_valid[:, columns], x_test[:, columns]
        chosen = min(strengths, key=lambda s: rmse(ridge(fit_x, fit[:, 2], s), valid_x, valid))
        w = ridge(fit_x, fit[:, 2], chosen)
        squared[name] = (np.clip(test_x @ w, 1, 5) - test[:, 2]) ** 2
        result["models"][name] = {"features": len(columns), "ridge": chosen, "valid_rmse": rmse(w, valid_x, valid),
                                  "test_rmse": rmse(w, test_x, test)}
    result["test_rmse_minus_history_only"] = {
        name: paired_bootstrap_delta(squared[name], squared["history only"], statistic="rmse") for name in models if name != "history only"}
    print(f"{'model':<26} {'features':>8} {'ridge':>7} {'valid RMSE':>11} {'test RMSE':>10}  test RMSE - history only (95% CI)")
    for name, m in result["models"].items():
        d = result["test_rmse_minus_history_only"].get(name)
        gain = f"{d['delta']:+.4f} ({d['ci95_low']:+.4f} .. {d['ci95_high']:+.4f})" if d else ""
        print(f"{name:<26} {m['features']:>8} {m['ridge']:>7g} {m['valid_rmse']:>11.4f} {m['test_rmse']:>10.4f}  {gain}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "rating_feature_probe_ml100k.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
