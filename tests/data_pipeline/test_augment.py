"""Teacher-labelled augmentation: the perturbed rows precompute labels, against what each op promises."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_pipeline.augment import augment_sequences, item_popularity


NUM_ITEMS = 50


def _sequences(n: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Distinct items within a sequence, so each op's effect can be told from the ids alone.
    return [rng.permutation(np.arange(1, NUM_ITEMS + 1))[: int(rng.integers(2, 30))] for _ in range(n)]


def _is_subsequence(small: np.ndarray, big: np.ndarray) -> bool:
    it = iter(big.tolist())
    return all(x in it for x in small.tolist())


def test_each_op_does_what_it_says():
    seqs = _sequences()
    for op in ("crop", "mask", "reorder", "substitute"):
        sources, rows = augment_sequences(seqs, NUM_ITEMS, 80, [op], rate=0.3, seed=1, max_len=50)
        assert len(rows) == 80 and len(sources) == 80
        for source, row in zip(sources, rows):
            seq = seqs[source]
            assert len(row) >= 2 and row.min() >= 1 and row.max() <= NUM_ITEMS, (op, row)
            if op == "crop":  # a contiguous window keeping at least 1 - rate of it
                starts = [i for i in range(len(seq) - len(row) + 1) if np.array_equal(seq[i : i + len(row)], row)]
                assert starts and len(row) >= min(len(seq), max(2, int(np.ceil(0.7 * len(seq))))), (seq, row)
            elif op == "mask":  # items left out, order kept
                assert _is_subsequence(row, seq) and len(seq) - len(row) == max(0, min(len(seq) - 2, round(0.3 * len(seq))))
            elif op == "reorder":  # the same items; only one window moved
                assert Counter(row.tolist()) == Counter(seq.tolist())
                moved = np.flatnonzero(row != seq)
                assert len(moved) == 0 or moved[-1] - moved[0] + 1 <= max(2, round(0.3 * len(seq)))
            else:  # the same length; at most round(rate * n) positions changed
                assert len(row) == len(seq) and (row != seq).sum() <= max(1, round(0.3 * len(seq)))
    # Sources cycle through the sequences: every one is used before any is used twice.
    sources, _ = augment_sequences(seqs, NUM_ITEMS, len(seqs), ["crop"], rate=0.3, seed=1, max_len=50)
    assert sorted(sources.tolist()) == list(range(len(seqs)))


def test_rows_are_a_pure_function_of_the_arguments_and_change_with_the_seed():
    seqs = _sequences()
    a = augment_sequences(seqs, NUM_ITEMS, 30, ["crop", "mask", "reorder", "substitute"], 0.3, seed=7, max_len=50)
    b = augment_sequences(seqs, NUM_ITEMS, 30, ["crop", "mask", "reorder", "substitute"], 0.3, seed=7, max_len=50)
    c = augment_sequences(seqs, NUM_ITEMS, 30, ["crop", "mask", "reorder", "substitute"], 0.3, seed=8, max_len=50)
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert not (np.array_equal(a[0], c[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], c[1])))


def test_rows_fit_the_teacher_window_and_substitutes_follow_popularity():
    seqs = [np.arange(1, 41)] * 5
    _, rows = augment_sequences(seqs, NUM_ITEMS, 10, ["reorder"], 0.5, seed=0, max_len=12)
    assert all(len(r) == 12 and set(r.tolist()) == set(range(29, 41)) for r in rows)
    popular = [np.array([3, 3, 3, 3, 3, 3, 3, 3, 7, 9])] * 3
    p = item_popularity(popular, NUM_ITEMS)
    assert p[0] == 0 and p[3] == pytest.approx(0.8) and p.sum() == pytest.approx(1.0)
    _, rows = augment_sequences(popular, NUM_ITEMS, 200, ["substitute"], 0.5, seed=0, max_len=50)
    assert set(np.concatenate(rows).tolist()) <= {3, 7, 9}


def test_bad_arguments_are_refused_and_nothing_to_augment_gives_nothing():
    with pytest.raises(ValueError, match="unknown augmentation ops \\['shuffle'\\]"):
        augment_sequences(_sequences(), NUM_ITEMS, 3, ["crop", "shuffle"], 0.3, 0, 50)
    with pytest.raises(ValueError, match="rate must be in"):
        augment_sequences(_sequences(), NUM_ITEMS, 3, ["crop"], 1.0, 0, 50)
    sources, rows = augment_sequences([np.array([4])], NUM_ITEMS, 3, ["crop"], 0.3, 0, 50)
    assert rows == [] and len(sources) == 0


def test_rating_rows_move_each_item_with_its_rating_and_substitutes_are_real_training_pairs():
    from data_pipeline.augment import augment_rating_sequences

    rng = np.random.default_rng(3)
    items = _sequences(30, seed=3)
    sequences = [(s, rng.integers(1, 6, len(s))) for s in items]
    pairs = {(int(i), int(v)) for s, levels in sequences for i, v in zip(s, levels)}
    for op in ("crop", "mask", "reorder", "substitute"):
        sources, rows = augment_rating_sequences(sequences, NUM_ITEMS, 5, 60, [op], rate=0.3, seed=2, max_len=12)
        for source, (row_items, row_levels) in zip(sources, rows):
            assert len(row_items) == len(row_levels) <= 12 and row_levels.min() >= 1 and row_levels.max() <= 5
            own = dict(zip(sequences[source][0].tolist(), sequences[source][1].tolist()))
            for item, level in zip(row_items.tolist(), row_levels.tolist()):
                assert (item, level) in pairs, (op, item, level)  # a pair someone gave in training
                if op != "substitute":  # the user's own items, each with the user's rating
                    assert own[item] == level, (op, item, level)
        if op == "substitute":  # some pairs are not the user's own
            assert any(dict(zip(*sequences[s])).get(int(i)) != int(v) for s, (r, lv) in zip(sources, rows) for i, v in zip(r, lv))


def test_substitutes_are_the_draws_of_numpy_choice_by_popularity():
    """The running sum is built once per call, not once per row; the rows are those of the per-row
    ``rng.choice(p=popularity)`` they replaced (so a store made before the change is remade identically)."""
    seqs = _sequences(60, seed=4)

    def reference(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, 0x5EED_A06])
        p = item_popularity(seqs, NUM_ITEMS)
        usable = np.arange(len(seqs))
        sources = np.concatenate([rng.permutation(usable) for _ in range(2)])[:90]
        rng.integers(0, 1, size=90)  # the op of each row (one op here)
        rows = []
        for source in sources:
            seq = seqs[source][-50:].copy()
            count = max(1, int(round(len(seq) * 0.3)))
            where = rng.choice(len(seq), size=count, replace=False)
            seq[where] = rng.choice(len(p), size=count, p=p)
            rows.append(seq)
        return rows

    _, rows = augment_sequences(seqs, NUM_ITEMS, 90, ["substitute"], rate=0.3, seed=7, max_len=50)
    assert all(np.array_equal(a, b) for a, b in zip(rows, reference(7))) and len(rows) == 90
