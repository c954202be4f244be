"""Parameter counts of :class:`distill.model.SequentialRecommender`, without building it.

``count_parameters`` is a closed formula (instant, usable to size a config);
``count_parameters_meta`` builds the real module on the ``meta`` device, which
allocates no memory, and is the ground truth the formula is tested against.
"""

from __future__ import annotations

import torch

from distill.config import ModelConfig
from distill.model import SequentialRecommender, item_bands


def count_parameters(cfg: ModelConfig, num_items: int) -> int:
    """Number of distinct trainable parameters of ``SequentialRecommender(cfg, num_items)``.

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
    return embeddings + cfg.num_layers * per_block + 2 * d + output


def count_parameters_meta(cfg: ModelConfig, num_items: int) -> int:
    """Count by building the model on the meta device (shapes only, no memory).

    ``Module.parameters()`` yields a shared (tied) Parameter once, so this matches the
    formula's "distinct parameters".
    """
    with torch.device("meta"):
        model = SequentialRecommender(cfg, num_items)
    return sum(p.numel() for p in model.parameters())
