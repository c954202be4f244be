"""The soft-label store: the teacher's outputs at every training position, written once, read by students.

The teacher (a causal next-item Transformer) runs once over every training
sequence. At every position ``t`` it produces logits over the catalog (ids
``1..num_items``; 0 is padding). Per position the store keeps:

* the top-``k`` item ids and their raw logits, sorted by logit, descending;
* ``lse`` = logsumexp over the full catalog, so a student can turn stored
  logits into exact teacher log-probabilities (``logit - lse``) and knows the
  tail mass ``1 - sum(exp(topk - lse))`` that the top-k leaves out;
* optionally, sampled soft labels: ``num_sampled`` draws with replacement from
  the teacher's softmax at temperature 1, kept as distinct ids, how often each
  was drawn, and their raw logits (the logits give importance weights when the
  student distils at another temperature). Temperature is applied at training
  time and never baked into the store.

One ROW is one training sequence, because the teacher and the student both
process a sequence in one forward pass; per-position values are list columns
of length ``n`` (the row's number of positions). Layout under ``store_url``
(any fsspec URL)::

    part-00000.parquet   rows of soft_label_schema(spec); provenance in the key-value metadata
    part-00000.json      commit record of that shard, written after it (see write_shard)
    ...
    manifest.json        written LAST: the commit point of the whole store

A shard counts as done only once its commit record exists, and a store only
once its manifest exists, so an interrupted precompute resumes from its commit
records (:func:`committed_shards`) and readers never see a half-made store.
Readers trust shards only through the manifest, which records each shard's
size and sha256 (:func:`read_shard`, :func:`verify_store`).

Ids are stored as ``uint16`` when the catalog fits (``num_items <= 65535``),
else ``int32``. Logits are stored as ``float16`` (fp16), ``float32`` (fp32), or
for bf16 as the raw bfloat16 bit pattern in ``uint16`` (Arrow has no bfloat16;
:func:`decode_positions` turns it back with ``torch.Tensor.view(torch.bfloat16)``).
``lse`` and sampled logits are always ``float32``: ``lse`` is one value per
position and needs the precision, since every probability is computed against it.

The package is split by responsibility; import from the package itself
(``from data_pipeline import soft_labels``), which re-exports every public name:

* :mod:`~data_pipeline.soft_labels.spec`: :class:`SoftLabelError`, :class:`StoreSpec`,
  :func:`soft_label_schema`, provenance (:func:`make_provenance`) and file names
  (:func:`shard_name`, :func:`record_name`);
* :mod:`~data_pipeline.soft_labels.encode`: teacher outputs -> validated rows
  (:func:`encode_rows`), and :func:`sample_soft_labels`;
* :mod:`~data_pipeline.soft_labels.writer`: shards and their commit protocol
  (:func:`write_shard`, :func:`committed_shards`, :func:`remove_manifest`,
  :func:`write_manifest`) and the Parquet encoding (``COMPRESSION``);
* :mod:`~data_pipeline.soft_labels.reader`: reading a committed store back and checking it
  (:func:`load_store_manifest`, :func:`manifest_spec`, :func:`read_shard`,
  :func:`verify_store`), summaries (:func:`format_manifest`, :func:`bytes_per_position`,
  :func:`raw_floor_bytes`);
* :mod:`~data_pipeline.soft_labels.decode`: store rows -> per-position training tensors
  (:func:`decode_positions`).
"""

from data_pipeline.soft_labels.decode import decode_positions
from data_pipeline.soft_labels.encode import encode_rows, sample_soft_labels
from data_pipeline.soft_labels.rating_rows import decode_rating_positions, encode_rating_rows
from data_pipeline.soft_labels.reader import (
    bytes_per_position,
    check_shard_provenance,
    format_manifest,
    load_store_manifest,
    manifest_spec,
    raw_floor_bytes,
    read_shard,
    verify_store,
)
from data_pipeline.soft_labels.spec import (
    KIND,
    MANIFEST,
    PROVENANCE_FIELDS,
    PROVENANCE_KEY,
    SCHEMA_VERSION,
    VALUE_DTYPES,
    SoftLabelError,
    StoreSpec,
    make_provenance,
    rating_store_schema,
    record_name,
    shard_name,
    soft_label_schema,
)
from data_pipeline.soft_labels.writer import (
    COMPRESSION,
    COMPRESSION_LEVEL,
    committed_shards,
    remove_manifest,
    write_manifest,
    write_shard,
)

__all__ = [
    # spec
    "KIND",
    "MANIFEST",
    "PROVENANCE_FIELDS",
    "PROVENANCE_KEY",
    "SCHEMA_VERSION",
    "VALUE_DTYPES",
    "SoftLabelError",
    "StoreSpec",
    "make_provenance",
    "record_name",
    "shard_name",
    "soft_label_schema",
    "rating_store_schema",
    # encode
    "encode_rows",
    "sample_soft_labels",
    "encode_rating_rows",
    "decode_rating_positions",
    # writer
    "COMPRESSION",
    "COMPRESSION_LEVEL",
    "committed_shards",
    "remove_manifest",
    "write_manifest",
    "write_shard",
    # reader
    "bytes_per_position",
    "check_shard_provenance",
    "format_manifest",
    "load_store_manifest",
    "manifest_spec",
    "raw_floor_bytes",
    "read_shard",
    "verify_store",
    # decode
    "decode_positions",
]
