"""The configuration sections the data components own: the input log and its split, and the soft-label store.

Composed into the top-level schema by :mod:`cluster.config`. ``None`` for a shard or
row-group size means "derived by the run plan" (:mod:`cluster.plan`) from the data's
size, the global batch sizes and the streaming reader's virtual shards.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ColumnMapping(Section):
    """Column names of a CSV/Parquet interaction log."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: Optional[str] = "timestamp"
    rating: Optional[str] = None


class SyntheticConfig(Section):
    """Size and structure of the embedded synthetic dataset (data.format=synthetic)."""

    num_users: int = Field(2000, gt=0)
    num_items: int = Field(500, gt=1)
    num_clusters: int = Field(20, gt=0)
    min_length: int = Field(8, ge=3)
    max_length: int = Field(40, ge=3)
    zipf_exponent: float = Field(1.1, gt=0)
    # Probability that the next item follows the Markov cluster transition (vs. a random popular item).
    transition_prob: float = Field(0.8, ge=0, le=1)
    # Probability that the next cluster is the current one's preferred successor.
    successor_prob: float = Field(0.7, ge=0, le=1)

    @model_validator(mode="after")
    def _lengths(self) -> "SyntheticConfig":
        if self.max_length < self.min_length:
            raise ValueError("max_length must be >= min_length")
        if self.num_clusters > self.num_items:
            raise ValueError("num_clusters must be <= num_items")
        return self


class DataConfig(Section):
    path: str = Field("", description="Input interaction log; any fsspec URL. Ignored for synthetic.")
    format: Literal["sasrec", "movielens_udata", "movielens_dat", "csv", "parquet", "synthetic"] = "synthetic"
    columns: ColumnMapping = ColumnMapping()
    csv_delimiter: str = ","
    min_rating: Optional[float] = None
    min_user_interactions: int = Field(3, ge=3, description="Users with fewer are dropped (leave-one-out needs 3).")
    min_item_interactions: int = Field(1, ge=1)
    rows_per_shard: int = Field(50_000, gt=0)
    row_group_size: Optional[int] = Field(
        None, gt=0, description="Users per Parquet row group (the baseline's streaming block); null = derived by the run plan."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    synthetic: SyntheticConfig = SyntheticConfig()


AUGMENT_OPS = ("crop", "mask", "reorder", "substitute")


class AugmentConfig(Section):
    """Teacher-labelled augmentation: perturbed copies of training sequences, labelled by the teacher.

    Each augmented row is one training sequence changed by one of ``ops`` (picked at random):
    ``crop`` keeps a random contiguous window; ``mask`` drops a share ``rate`` of its items (the
    model has no mask token); ``reorder`` shuffles a random window of ``rate`` of its length;
    ``substitute`` replaces a share ``rate`` of its items by items drawn by training popularity.
    The rows carry the teacher's labels at every position and no hard target. For the rating
    task each (item, rating) pair moves whole, and ``substitute`` draws training pairs by frequency.
    """

    ratio: float = Field(0.0, ge=0, le=16, description="Augmented rows per training sequence (0 = off).")
    ops: list[Literal[AUGMENT_OPS]] = Field(
        default_factory=lambda: list(AUGMENT_OPS), description="Perturbations, each row gets one at random.")
    rate: float = Field(0.3, gt=0, lt=1, description="Share of a sequence that mask/reorder/substitute change; crop keeps 1 - rate..1.")

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        # One canonical list: the rows depend on it, and the store's provenance records it.
        if not ops:
            raise ValueError(f"ops must list at least one of {', '.join(AUGMENT_OPS)}")
        return sorted(set(ops))

    def settings(self) -> Optional[dict[str, Any]]:
        """What the store records (and its fingerprint covers); None when off."""
        return None if self.ratio == 0 else {"ratio": self.ratio, "ops": list(self.ops), "rate": self.rate}


class PrecomputeConfig(Section):
    k: int = Field(64, gt=0, description="Top-k ids and logits stored per position.")
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    num_sampled: int = Field(0, ge=0, description="Draws per position for sampled soft labels (0 = off).")
    # Rows are whole training sequences (up to max_len positions each). null = derived by the run plan
    # from the number of sequences, the student's global batch and distill.num_virtual_shards.
    rows_per_shard: Optional[int] = Field(None, gt=0, description="Sequences per store file; null = derived by the run plan.")
    row_group_size: Optional[int] = Field(
        None, gt=0, description="Sequences per row group (the streaming reader's block); null = derived by the run plan."
    )
    batch_size: int = Field(32, gt=0, description="Sequences per teacher forward (memory: batch x max_len x catalog floats).")
    augment: AugmentConfig = AugmentConfig()
