"""Parameter counts of :class:`distill.model.SequentialRecommender`, without building it.

``count_parameters`` is a closed formula (instant, usable to size a config);
``count_parameters_meta`` builds the real module on the ``meta`` device, which
allocates no memory, and is the ground truth the formula is tested against.
"""

from __future__ import annotations

import torch

from distill.config import ModelConfig
from distill.model import SequentialRecommender, item_bands


def count_parameters(cfg: ModelConfig, num_items: int, num_levels: int = 0) -> int:
    """Number of distinct trainable parameters of ``SequentialRecommender(cfg, num_items)`` (with ``num_levels``:
    of the rating task's ``RatingModel``, which adds a rating embedding ``(R+1)*d`` and a head
    ``(3d*d + d) + (d*R + R)``).

    With d = d_model, f = ffn_dim, V = num_items + 1 (padding row included):

    * item embedding ``V*d`` (or, with ``item_dims``, ``n_b*dim_b`` per band plus a
      ``dim_b*d`` projection where ``dim_b < d``) and position embedding ``max_len*d``;
    * per block: two LayerNorms ``2*2d``, attention in/out projections with bias
      ``(3d*d + 3d) + (d*d + d)``, FFN ``(d*f + f) + (f*d + d)``,
      i.e. ``4d^2 + 2df + 9d + f``;
    * final LayerNorm ``2d``;
    * a separate output embedding ``V*d`` (no bias) only when embeddings are untied.
    """
    d, f, vocab = cfg.d_model, cfg.ffn_dim, num_items + 1
    if cfg.item_dims:  # mixed-dim table: each band's rows plus its projection; no padding row
        items = sum(n * dim + (dim * d if dim != d else 0) for n, dim in item_bands(cfg.item_dims, num_items))
    else:
        items = vocab * d
    embeddings = items + cfg.max_len * d
    per_block = 4 * d * d + 2 * d * f + 9 * d + f
    output = 0 if cfg.tied_embeddings else vocab * d
    rating = (num_levels + 1) * d + 3 * d * d + d + d * num_levels + num_levels if num_levels else 0
    return embeddings + cfg.num_layers * per_block + 2 * d + output + rating


def count_parameters_meta(cfg: ModelConfig, num_items: int) -> int:
    """Count by building the model on the meta device (shapes only, no memory).

    ``Module.parameters()`` yields a shared (tied) Parameter once, so this matches the
    formula's "distinct parameters".
    """
    with torch.device("meta"):
        model = SequentialRecommender(cfg, num_items)
    return sum(p.numel() for p in model.parameters())


def largest_parameter(cfg: ModelConfig, num_items: int) -> int:
    """Elements of the model's largest parameter tensor (the meta device again: shapes only)."""
    with torch.device("meta"):
        model = SequentialRecommender(cfg, num_items)
    return max(p.numel() for p in model.parameters())


def fit_to_budget(template: ModelConfig, num_items: int, budget: int) -> ModelConfig:
    """The widest model like ``template`` with at most ``budget`` parameters.

    Keeps the template's depth, heads, sequence length, dropout and its FFN-to-width ratio,
    and chooses ``d_model`` (a multiple of ``num_heads``, as attention needs). A template
    with a banded item table keeps its band sizes, each band's width scaled with ``d_model``.
    Raises ``ValueError`` when even the narrowest such model exceeds the budget.
    """
    ratio = template.ffn_dim / template.d_model
    heads = template.num_heads

    def at(width: int) -> ModelConfig:
        bands = None
        if template.item_dims:
            scale = width / template.d_model
            bands = [{"items": b.items, "dim": max(1, min(width, round(b.dim * scale)))} for b in template.item_dims]
        return ModelConfig.model_validate(
            {**template.model_dump(), "d_model": width, "ffn_dim": max(1, round(ratio * width)), "item_dims": bands})

    best = None
    width = heads
    while True:  # parameters grow with the width: stop at the first that is too large
        candidate = at(width)
        if count_parameters(candidate, num_items) > budget:
            break
        best, width = candidate, width + heads
    if best is None:
        narrowest = count_parameters(at(heads), num_items)
        raise ValueError(f"no model like the template fits {budget:,} parameters over {num_items:,} items: the narrowest "
                         f"(d_model={heads}) has {narrowest:,}. Raise the budget, or use fewer layers or a banded item table")
    return best
