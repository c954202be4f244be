"""Encoding the teacher's outputs into store rows, with validation; and drawing sampled soft labels.

Owns :func:`encode_rows` (R sequences of per-position teacher outputs -> a
table of :func:`~data_pipeline.soft_labels.spec.soft_label_schema`, every
value checked and every failure naming the shard and example id) and
:func:`sample_soft_labels` (the sampled soft labels :func:`encode_rows` takes).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from data_pipeline.soft_labels.spec import SoftLabelError, StoreSpec, soft_label_schema


def _lengths(arrays: Sequence[Any]) -> np.ndarray:
    # map(len) iterates in C; this is per row (or per position for sampled lists), not a Python-level loop body.
    return np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(n,) lengths -> (n+1,) int64 offsets starting at 0."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _concat(arrays: Sequence[np.ndarray], dtype: Any, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    """Concatenate along axis 0 (one C call, whatever the number of arrays) and cast."""
    if len(arrays) == 0:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


class _Locator:
    """Names a flat position for error messages: its example id, row's seq_index and position in the row."""

    def __init__(self, shard: str, seq_index: np.ndarray, example_start: np.ndarray, offsets: np.ndarray):
        self.shard, self.seq_index, self.example_start, self.offsets = shard, seq_index, example_start, offsets

    def position(self, p: int) -> str:
        row = int(np.searchsorted(self.offsets, p, side="right") - 1)
        t = int(p - self.offsets[row])
        return f"example {int(self.example_start[row]) + t} (seq_index {int(self.seq_index[row])}, position {t})"

    def row(self, r: int) -> str:
        return f"row {r} (seq_index {int(self.seq_index[r])}, example_start {int(self.example_start[r])})"


def _row_lengths(shard_name: str, spec: StoreSpec, seq_index: np.ndarray, example_start: np.ndarray,
                 per_row: dict[str, Sequence[Any]], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, "_Locator"]:
    """Every per-position list of a row (``names``) has the row's ``targets`` length n_i, at most max_len:
    returns (n, offsets, a locator for error messages)."""
    n = _lengths(per_row["targets"])
    offsets = _offsets(n)
    loc = _Locator(shard_name, seq_index, example_start, offsets)
    for name in names:
        other = _lengths(per_row[name])
        if np.any(other != n):
            r = int(np.flatnonzero(other != n)[0])
            raise SoftLabelError(f"{shard_name}: {name} of {loc.row(r)} has {other[r]} positions, targets has {n[r]}")
    if np.any(n > spec.max_len):
        r = int(np.flatnonzero(n > spec.max_len)[0])
        raise SoftLabelError(f"{shard_name}: {loc.row(r)} has {n[r]} positions, more than max_len={spec.max_len}")
    return n, offsets, loc


def _first_bad_position(bad: np.ndarray) -> Optional[int]:
    """Index of the first position with any True in ``bad`` ((P,) or (P, ...)), or None."""
    per_position = bad.reshape(len(bad), -1).any(axis=1) if bad.ndim > 1 else bad
    hits = np.flatnonzero(per_position)
    return int(hits[0]) if len(hits) else None


def _check_finite(values: np.ndarray, what: str, loc: _Locator, position_of: Optional[np.ndarray] = None) -> None:
    """SoftLabelError naming the first position whose ``values`` hold NaN/inf.

    ``values`` is (P, ...) per position, or flat with ``position_of`` mapping each entry to its position.
    """
    bad = ~np.isfinite(values)
    first = _first_bad_position(bad)
    if first is not None:
        p = first if position_of is None else int(position_of[first])
        raise SoftLabelError(
            f"{loc.shard}: {what} of {loc.position(p)} is NaN or infinite; the teacher output is broken"
        )


def _check_ids(
    ids: np.ndarray, what: str, num_items: int, loc: _Locator, position_of: Optional[np.ndarray] = None
) -> None:
    """SoftLabelError naming the first position with an id outside 1..num_items.

    ``ids`` is (P,) or (P, k) per position, or flat with ``position_of`` as in :func:`_check_finite`.
    """
    bad = (ids < 1) | (ids > num_items)
    first = _first_bad_position(bad)
    if first is not None:
        p = first if position_of is None else int(position_of[first])
        row_ids, row_bad = ids.reshape(len(ids), -1)[first], bad.reshape(len(bad), -1)[first]
        raise SoftLabelError(
            f"{loc.shard}: {what} of {loc.position(p)} holds id {int(row_ids[row_bad][0])}, outside 1..{num_items}"
        )


def _encode_values(spec: StoreSpec, logits: np.ndarray, loc: _Locator, what: str = "topk_logits") -> pa.Array:
    """(P, k) float32 logits -> flat Arrow array of the store's value type (P*k,)."""
    if spec.value_dtype == "fp32":
        return pa.array(logits.reshape(-1))
    if spec.value_dtype == "fp16":
        with np.errstate(over="ignore"):  # reported below, with the example id
            encoded = logits.astype(np.float16)
        check = encoded
    else:
        # torch rounds float32 -> bfloat16 to nearest-even; keep the 16 bits.
        bf16 = torch.from_numpy(np.ascontiguousarray(logits)).to(torch.bfloat16)
        encoded = bf16.view(torch.int16).numpy().view(np.uint16)
        check = bf16.float().numpy()
    # The input was finite (checked before), so a non-finite value here is an overflow of the narrow type.
    first = _first_bad_position(~np.isfinite(check))
    if first is not None:
        raise SoftLabelError(
            f"{loc.shard}: {what} of {loc.position(first)} overflow {spec.value_dtype} "
            f"(max |logit| {float(np.abs(logits[first]).max()):.4g}); store fp32 instead"
        )
    return pa.array(encoded.reshape(-1))


def _list(offsets: np.ndarray, values: pa.Array, shard: str) -> pa.Array:
    """list<X> array from (n+1,) offsets into ``values`` (Arrow lists use int32 offsets)."""
    if offsets[-1] > np.iinfo(np.int32).max:
        raise SoftLabelError(f"{shard}: {offsets[-1]} list entries exceed Arrow's int32 offsets; lower rows_per_shard")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def encode_rows(
    spec: StoreSpec,
    seq_index: np.ndarray,
    users: np.ndarray,
    example_start: np.ndarray,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    topk_ids: Sequence[np.ndarray],
    topk_logits: Sequence[np.ndarray],
    lse: Sequence[np.ndarray],
    sampled: Optional[Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[np.ndarray]]]],
    shard_name: str,
    augmented: Optional[np.ndarray] = None,
) -> pa.Table:
    """Validate and encode R sequences into a table of :func:`soft_label_schema`.

    Per row ``i`` with ``n_i`` positions: ``inputs[i]``, ``targets[i]``: (n_i,)
    int item ids; ``topk_ids[i]``: (n_i, k) int; ``topk_logits[i]``: (n_i, k)
    float32 raw logits sorted descending along k; ``lse[i]``: (n_i,) float32,
    logsumexp of the raw logits over ids 1..num_items (padding excluded).
    ``seq_index``, ``users``, ``example_start``: (R,); ``seq_index`` must be
    consecutive (a shard is a contiguous slice of the global order, which is
    what lets the manifest check coverage from first/last seq alone).
    ``sampled`` is required iff ``spec.num_sampled > 0``: per row a tuple
    ``(ids, counts, logits)`` of n_i per-position arrays (d_t,) each, as
    returned by :func:`sample_soft_labels` sliced to the row. ``augmented``
    (R,) bool is required iff ``spec.augmented_rows``: an augmented row's
    targets must all be 0 (it has no hard target), every other row's are ids.

    ``shard_name`` only labels error messages. Raises :class:`SoftLabelError`
    naming the shard and the example id (``example_start + t``) of the first
    bad position: NaN/inf logits or lse, ids outside 1..num_items, wrong k,
    unsorted top-k, lse below the top logit, logits overflowing fp16/bf16,
    sampled counts not summing to ``num_sampled``.
    """
    seq_index = np.asarray(seq_index, dtype=np.int64).reshape(-1)
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    example_start = np.asarray(example_start, dtype=np.int64).reshape(-1)
    num_rows = len(seq_index)
    per_row = {"users": users, "example_start": example_start, "inputs": inputs, "targets": targets,
               "topk_ids": topk_ids, "topk_logits": topk_logits, "lse": lse}
    if sampled is not None:
        per_row["sampled"] = sampled
    for name, values in per_row.items():
        if len(values) != num_rows:
            raise SoftLabelError(f"{shard_name}: {name} has {len(values)} rows but seq_index has {num_rows}")
    if num_rows == 0:
        raise SoftLabelError(f"{shard_name}: no rows to encode")
    if (sampled is not None) != (spec.num_sampled > 0):
        raise SoftLabelError(
            f"{shard_name}: sampled soft labels {'given' if sampled is not None else 'missing'} "
            f"but the spec has num_sampled={spec.num_sampled}"
        )
    if (augmented is not None) != spec.augmented_rows:
        raise SoftLabelError(f"{shard_name}: augmented flags {'given' if augmented is not None else 'missing'} "
                             f"but the spec has augmented_rows={spec.augmented_rows}")
    if augmented is not None:
        augmented = np.asarray(augmented, dtype=bool).reshape(-1)
        if len(augmented) != num_rows:
            raise SoftLabelError(f"{shard_name}: augmented has {len(augmented)} rows but seq_index has {num_rows}")
    if num_rows > 1 and np.any(np.diff(seq_index) != 1):
        r = int(np.flatnonzero(np.diff(seq_index) != 1)[0])
        raise SoftLabelError(
            f"{shard_name}: seq_index must be consecutive within a shard, but row {r + 1} has "
            f"{int(seq_index[r + 1])} after {int(seq_index[r])}"
        )
    if seq_index[0] < 0:
        raise SoftLabelError(f"{shard_name}: seq_index starts at {int(seq_index[0])}, must be >= 0")

    n, offsets, loc = _row_lengths(shard_name, spec, seq_index, example_start, per_row, ("inputs", "topk_ids", "topk_logits", "lse"))
    for name in ("topk_ids", "topk_logits"):
        # One shape check per row (not per position) so the error can name the row.
        shapes = [np.shape(a) for a in per_row[name]]
        bad = [r for r, s in enumerate(shapes) if len(s) != 2 or s[1] != spec.k]
        if bad:
            r = bad[0]
            raise SoftLabelError(
                f"{shard_name}: {name} of {loc.row(r)} has shape {shapes[r]}, expected (n, k={spec.k})"
            )

    flat_inputs = _concat(inputs, np.int64)
    flat_targets = _concat(targets, np.int64)
    flat_ids = _concat(topk_ids, np.int64, (spec.k,))
    flat_logits = _concat(topk_logits, np.float32, (spec.k,))
    flat_lse = _concat(lse, np.float32)

    _check_finite(flat_logits, "topk_logits", loc)
    _check_finite(flat_lse, "lse", loc)
    _check_ids(flat_inputs, "inputs", spec.num_items, loc)
    if augmented is None:
        _check_ids(flat_targets, "targets", spec.num_items, loc)
    else:  # augmented rows carry no hard target (0); the real rows' targets are ids
        on_augmented = np.repeat(augmented, n)
        first = _first_bad_position(on_augmented & (flat_targets != 0))
        if first is not None:
            raise SoftLabelError(f"{shard_name}: targets of {loc.position(first)} are not 0, but its row is augmented "
                                 "(augmented rows have no hard target)")
        flat_targets_real = np.where(on_augmented, 1, flat_targets)
        _check_ids(flat_targets_real, "targets", spec.num_items, loc)
    _check_ids(flat_ids, "topk_ids", spec.num_items, loc)
    first = _first_bad_position(np.diff(flat_logits, axis=1) > 0)
    if first is not None:
        raise SoftLabelError(f"{shard_name}: topk_logits of {loc.position(first)} are not sorted in descending order")
    # logsumexp >= max logit; a smaller lse was computed over something else (another temperature, a subset).
    slack = 1e-3 * np.maximum(1.0, np.abs(flat_lse))
    first = _first_bad_position(flat_lse + slack < flat_logits[:, 0]) if len(flat_lse) else None
    if first is not None:
        raise SoftLabelError(
            f"{shard_name}: lse of {loc.position(first)} is {flat_lse[first]:.6g}, below the top logit "
            f"{flat_logits[first, 0]:.6g}; lse must be the logsumexp of the raw logits over the whole catalog"
        )

    id_np = np.uint16 if spec.id_dtype == "uint16" else np.int32
    # (P, k) -> P fixed-size lists of k over the flat (P*k,) values.
    per_position_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat_ids.astype(id_np).reshape(-1)), spec.k)
    per_position_values = pa.FixedSizeListArray.from_arrays(_encode_values(spec, flat_logits, loc), spec.k)
    columns: dict[str, pa.Array] = {
        "seq_index": pa.array(seq_index, pa.int64()),
        "user": pa.array(users.astype(np.int32), pa.int32()),
        "example_start": pa.array(example_start, pa.int64()),
        "inputs": _list(offsets, pa.array(flat_inputs.astype(np.int32)), shard_name),
        "targets": _list(offsets, pa.array(flat_targets.astype(np.int32)), shard_name),
        "topk_ids": _list(offsets, per_position_ids, shard_name),
        "topk_logits": _list(offsets, per_position_values, shard_name),
        "lse": _list(offsets, pa.array(flat_lse), shard_name),
    }
    if sampled is not None:
        columns.update(_encode_sampled(spec, sampled, n, offsets, loc, id_np))
    if augmented is not None:
        columns["augmented"] = pa.array(augmented, pa.bool_())
    return pa.Table.from_pydict(columns, schema=soft_label_schema(spec))


def _encode_sampled(
    spec: StoreSpec, sampled: Sequence[tuple], n: np.ndarray, offsets: np.ndarray, loc: _Locator, id_np: Any
) -> dict[str, pa.Array]:
    """The three sampled columns (list<list<...>>) from per-row tuples of per-position arrays."""
    # Flatten rows -> positions (P lists) -> entries; chain/map run in C.
    parts = []
    for j, name in enumerate(("sampled_ids", "sampled_counts", "sampled_logits")):
        per_position = list(itertools.chain.from_iterable(row[j] for row in sampled))
        rows_n = np.fromiter((len(row[j]) for row in sampled), dtype=np.int64, count=len(sampled))
        if np.any(rows_n != n):
            r = int(np.flatnonzero(rows_n != n)[0])
            raise SoftLabelError(f"{loc.shard}: {name} of {loc.row(r)} has {rows_n[r]} positions, targets has {n[r]}")
        parts.append(per_position)
    ids_pp, counts_pp, logits_pp = parts
    distinct = _lengths(ids_pp)
    for name, other in (("sampled_counts", counts_pp), ("sampled_logits", logits_pp)):
        lengths = _lengths(other)
        if np.any(lengths != distinct):
            p = int(np.flatnonzero(lengths != distinct)[0])
            raise SoftLabelError(
                f"{loc.shard}: {name} of {loc.position(p)} has {lengths[p]} entries, sampled_ids has {distinct[p]}"
            )
    inner = _offsets(distinct)
    position_of = np.repeat(np.arange(len(distinct)), distinct)  # (E,) entry -> flat position
    flat_ids = _concat(ids_pp, np.int64)
    flat_counts = _concat(counts_pp, np.int64)
    flat_logits = _concat(logits_pp, np.float32)
    _check_ids(flat_ids, "sampled_ids", spec.num_items, loc, position_of)
    _check_finite(flat_logits, "sampled_logits", loc, position_of)
    totals = np.bincount(position_of, weights=flat_counts, minlength=len(distinct)) if len(distinct) else distinct
    bad = (totals != spec.num_sampled) | (distinct == 0)
    if np.any(bad) or np.any(flat_counts < 1):
        p = int(np.flatnonzero(bad)[0]) if np.any(bad) else int(position_of[np.flatnonzero(flat_counts < 1)[0]])
        raise SoftLabelError(
            f"{loc.shard}: sampled_counts of {loc.position(p)} sum to {int(totals[p])} "
            f"(each >= 1 expected), the spec has num_sampled={spec.num_sampled}"
        )

    def nested(values: pa.Array) -> pa.Array:
        return _list(offsets, _list(inner, values, loc.shard), loc.shard)

    return {
        "sampled_ids": nested(pa.array(flat_ids.astype(id_np))),
        "sampled_counts": nested(pa.array(flat_counts.astype(np.uint16))),
        "sampled_logits": nested(pa.array(flat_logits)),
    }


def sample_soft_labels(
    logits: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Draw ``num_samples`` ids per position from the teacher's softmax (temperature 1), with replacement.

    ``logits``: (P, C) float32, column 0 is padding and never drawn (the
    softmax is over columns 1..C-1). Returns three lists of P arrays, one per
    position: distinct ids drawn (d_t,) int64 in increasing order, how often each
    was drawn (d_t,) int64 (summing to ``num_samples``), and their raw logits
    (d_t,) float32. Deterministic for a given ``generator`` state (and device).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise SoftLabelError(f"sample_soft_labels: logits must be (P, C>=2), got {tuple(logits.shape)}")
    num_positions = logits.shape[0]
    if num_positions == 0:
        return [], [], []
    probs = torch.softmax(logits[:, 1:].float(), dim=1)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator) + 1  # (P, S) ids
    draws, _ = torch.sort(draws, dim=1)
    # Distinct ids = starts of runs in each sorted row; column 0 always starts a run, so runs never span rows.
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    start_idx = torch.nonzero(starts.reshape(-1)).squeeze(1)  # (E,) flat indices into (P*S,)
    ids = draws.reshape(-1)[start_idx]
    counts = torch.diff(start_idx, append=torch.tensor([draws.numel()], device=start_idx.device))
    rows = start_idx // num_samples
    values = logits[rows, ids].float()
    split_at = np.cumsum(starts.sum(dim=1).cpu().numpy())[:-1]
    return (
        np.split(ids.cpu().numpy(), split_at),
        np.split(counts.cpu().numpy(), split_at),
        np.split(values.cpu().numpy(), split_at),
    )
