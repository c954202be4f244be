"""The rating model: a user's history of (item, rating) -> a distribution over their rating of a target item.

The same Transformer family as the next-item model (:class:`distill.model.SequentialRecommender`
is its trunk: causal self-attention over the left-padded history, right-aligned positions); each
position's input is its item's vector plus its rating's. The state after the history, ``h``, and
the target item's vector ``e`` (the trunk's own item table) go through a small head,
``MLP([h, e, h * e]) -> R logits`` (the elementwise product lets the head score how well the
item fits the user's taste, as a dot product would, while the MLP can still read either alone).

Levels: ratings are level indices ``1..R`` in the inputs (0 = padding) and ``0..R-1`` as targets.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.config import ModelConfig
from distill.model import PAD_ID, SequentialRecommender, _Embedding, _Linear


class RatingModel(nn.Module):
    tied_weight_keys = ("trunk.output.weight",)  # the trunk's unused output matrix, tied to its item table

    def __init__(self, cfg: ModelConfig, num_items: int, num_levels: int):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"a rating task needs at least 2 rating levels, got {num_levels}")
        self.cfg, self.num_items, self.num_levels = cfg, num_items, num_levels
        self.trunk = SequentialRecommender(cfg, num_items)
        self.rating_emb = _Embedding(num_levels + 1, cfg.d_model, padding_idx=PAD_ID)
        d = cfg.d_model
        self.head = nn.Sequential(_Linear(3 * d, d), nn.GELU(), _Linear(d, num_levels))

    def hidden(self, items: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids and rating levels (1..R, 0 = padding), left-padded -> (B, L, d): state t sees (item, rating) <= t."""
        if items.shape != levels.shape:
            raise ValueError(f"items {tuple(items.shape)} and levels {tuple(levels.shape)} differ in shape")
        return self.trunk(items, self.rating_emb(levels))

    def rating_logits(self, hidden: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        """(..., d) states and (...) target item ids -> (..., R) logits of the rating each target gets."""
        target = self.trunk.item_vectors(target_items)
        return self.head(torch.cat([hidden, target, hidden * target], dim=-1))

    def sequence_logits(self, items: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training on whole (B, L) sequences: at every position with a history, the rating of the next item from
        the state after the items before it. The input is the sequence but its last item, as in next-item training,
        so a history's last item always sits at the last position id, in training and in :meth:`predict` alike.
        Returns ``(logits (B, L-1, R), targets (B, L-1) in 0..R-1, valid (B, L-1) bool)``."""
        states = self.hidden(items[:, :-1], levels[:, :-1])
        logits = self.rating_logits(states, items[:, 1:])
        valid = (items[:, :-1] != PAD_ID) & (items[:, 1:] != PAD_ID)
        return logits, (levels[:, 1:] - 1).clamp(min=0), valid

    def predict(self, items: torch.Tensor, levels: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        """(B, L) history, (B,) target items -> (B, R) rating logits (the model reads the last ``max_len`` history items)."""
        items, levels = items[:, -self.cfg.max_len:], levels[:, -self.cfg.max_len:]
        return self.rating_logits(self.hidden(items, levels)[:, -1], target_items)
