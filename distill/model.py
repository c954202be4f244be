"""A SASRec-style sequential recommender: a causal, pre-norm Transformer over item ids.

Conventions shared with the rest of ``distill``:

* Catalog ids are ``1..num_items``; id ``0`` is padding. Every item table therefore
  has ``num_items + 1`` rows and every score vector ``num_items + 1`` columns.
* Inputs are LEFT-padded ``(B, L)`` LongTensors with ``L <= max_len`` (see
  :mod:`distill.sequences`), so the most recent item is always at position ``L - 1``.
* Position embeddings are right-aligned: the last input position always gets position
  id ``max_len - 1``, the one before ``max_len - 2`` and so on. A position id thus means
  "how many steps ago", which makes the output for the real items independent of how
  much left padding (or how large an ``L``) a batch happens to use.
* Item embeddings are multiplied by ``sqrt(d_model)`` before the position embedding is
  added, as in SASRec and the original Transformer. With the normal(0, 0.02) init this
  lets the item identity dominate the position signal at the start of training.
* ``scores`` puts the smallest finite value of the dtype (not ``-inf``) in the padding
  column 0: it is never ranked, its softmax probability is exactly 0, and products
  such as ``p * log_softmax(scores)`` with ``p = 0`` stay 0 instead of becoming NaN
  (``0 * -inf = NaN``), which matters for the distillation losses.

Item table: one ``d_model``-wide embedding by default, or (``ModelConfig.item_dims``) a
:class:`MixedDimItemTable` whose popularity bands have narrower vectors projected up to
``d_model``. Either way one table both embeds the inputs and scores the catalog (tied).

ZeRO-3 (``deepspeed.zero.Init``): parameters are initialised inside each leaf module's
own ``__init__`` (via ``reset_parameters``), before DeepSpeed partitions them, and
weights are only read inside a module's ``forward`` (where DeepSpeed gathers them). The
tied output projection is an ``nn.Linear`` that shares the embedding's ``Parameter``
(the Hugging Face convention), so :meth:`SequentialRecommender.scores` gathers it
through that module's forward even when called outside the model's own forward.
When tied, ``state_dict()`` holds the same tensor under ``item_emb.weight`` and
``output.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.config import ItemDimBand, ModelConfig

PAD_ID = 0
INIT_STD = 0.02


class _Linear(nn.Linear):
    """``nn.Linear`` with normal(0, 0.02) weights and zero bias, set in its own __init__."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _Embedding(nn.Embedding):
    """``nn.Embedding`` with normal(0, 0.02) rows; the ``padding_idx`` row stays zero."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        self._fill_padding_idx_with_zero()


def item_bands(bands: list[ItemDimBand], num_items: int) -> list[tuple[int, int]]:
    """``(items, dim)`` per band for a catalog of ``num_items``, most popular band first.

    Bands take their ``items`` in order until the catalog runs out; the last takes the rest;
    bands left with no items are dropped (a config written for a larger catalog still fits).
    """
    out, left = [], num_items
    for band in bands:
        n = left if band.items is None else min(band.items, left)
        if n > 0:
            out.append((n, band.dim))
        left -= n
    return out


class MixedDimItemTable(nn.Module):
    """Item vectors of width ``d_model`` assembled from popularity bands of narrower ones.

    Band b holds ``n_b`` items with vectors of width ``dim_b`` (``band{b}``, shape
    ``(n_b, dim_b)``), mapped to ``d_model`` by ``proj{b}`` (``(dim_b, d_model)``; none when
    ``dim_b == d_model``). Calling the module returns the whole ``(num_items + 1, d_model)``
    table, row 0 (padding) zero. Which item sits in which band is the buffer ``item_row``
    (item id -> row in band order), set from training counts by :meth:`set_item_order` and
    saved with the weights. The parameters live on this module itself, so ZeRO-3 gathers
    them for its forward.
    """

    def __init__(self, num_items: int, d_model: int, bands: list[tuple[int, int]]):
        super().__init__()
        if sum(n for n, _ in bands) != num_items:
            raise ValueError(f"item bands hold {sum(n for n, _ in bands)} items, the catalog {num_items}")
        self.num_items, self.d_model, self.bands = num_items, d_model, bands
        for b, (n, dim) in enumerate(bands):
            self.register_parameter(f"band{b}", nn.Parameter(torch.empty(n, dim)))
            if dim != d_model:
                self.register_parameter(f"proj{b}", nn.Parameter(torch.empty(dim, d_model)))
        # Until set_item_order is called, items fill the bands in id order.
        self.register_buffer("item_row", torch.arange(num_items + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for b, (_, dim) in enumerate(self.bands):
            nn.init.normal_(getattr(self, f"band{b}"), mean=0.0, std=INIT_STD)
            if dim != self.d_model:
                # std 1/sqrt(dim) keeps a projected row's scale at INIT_STD, like a d_model-wide row.
                nn.init.normal_(getattr(self, f"proj{b}"), mean=0.0, std=1.0 / math.sqrt(dim))

    @torch.no_grad()
    def set_item_order(self, item_counts) -> None:
        """Put the most frequent items in the first (widest) band. ``item_counts``: (num_items + 1,), [0] = padding."""
        counts = torch.as_tensor(item_counts, dtype=torch.float64).cpu()
        if counts.shape != (self.num_items + 1,):
            raise ValueError(f"item_counts must have shape ({self.num_items + 1},), got {tuple(counts.shape)}")
        by_popularity = torch.sort(-counts[1:], stable=True).indices + 1  # item ids, most frequent first
        row = torch.zeros(self.num_items + 1, dtype=torch.long)
        row[by_popularity] = torch.arange(1, self.num_items + 1)
        self.item_row.copy_(row)

    def forward(self) -> torch.Tensor:
        """() -> (num_items + 1, d_model): every item's vector, indexed by item id."""
        first = getattr(self, "band0")
        rows = [first.new_zeros(1, self.d_model)]
        for b, (_, dim) in enumerate(self.bands):
            band = getattr(self, f"band{b}")
            rows.append(band @ getattr(self, f"proj{b}") if dim != self.d_model else band)
        return torch.cat(rows)[self.item_row]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention under a boolean ``(B, 1, L, L)`` mask (True = may attend)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = _Linear(d_model, 3 * d_model)
        self.proj = _Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d), attn_mask: (B, 1, L, L) bool -> (B, L, d)."""
        B, L, d = x.shape
        # (B, L, 3, H, d/H) -> three tensors of shape (B, H, L, d/H)
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            _Linear(cfg.d_model, cfg.ffn_dim),
            nn.GELU(),
            _Linear(cfg.ffn_dim, cfg.d_model),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d), attn_mask: (B, 1, L, L) bool -> (B, L, d)."""
        x = x + self.dropout(self.attn(self.ln_attn(x), attn_mask))
        return x + self.dropout(self.ffn(self.ln_ffn(x)))


class SequentialRecommender(nn.Module):
    """Next-item model: ``(B, L)`` left-padded item ids -> scores over the whole catalog.

    Args:
        cfg: the architecture (``d_model``, ``num_layers``, ``num_heads``, ``ffn_dim``,
            ``max_len``, ``dropout``, ``tied_embeddings``).
        num_items: catalog size; valid ids are ``1..num_items``, 0 is padding.
    """

    #: Parameters that are another one's (the output matrix is the item table when embeddings are tied): stored once.
    tied_weight_keys = ("output.weight",)

    def __init__(self, cfg: ModelConfig, num_items: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_emb = self.output = self.item_table = None
        if cfg.item_dims:
            self.item_table = MixedDimItemTable(num_items, cfg.d_model, item_bands(cfg.item_dims, num_items))
        else:
            self.item_emb = _Embedding(num_items + 1, cfg.d_model, padding_idx=PAD_ID)
        self.pos_emb = _Embedding(cfg.max_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # Activation checkpointing (how to train, not what): in training, keep only each block's input and
        # recompute the block in the backward. Dropout replays the same mask (torch saves the RNG state).
        self.checkpoint_activations = False
        self.ln_final = nn.LayerNorm(cfg.d_model)
        if self.item_table is None:
            self.output = _Linear(cfg.d_model, num_items + 1, bias=False)
            if cfg.tied_embeddings:
                # Share the Parameter itself (not a copy): scores are hidden @ item_emb.T.
                self.output.weight = self.item_emb.weight

    @property
    def num_scores(self) -> int:
        """Width of a score vector: ``num_items + 1`` (column 0 is padding)."""
        return self.num_items + 1

    def forward(self, input_ids: torch.Tensor, extra_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of every position.

        Args:
            input_ids: (B, L) int64, left-padded with 0, ``L <= max_len``.
            extra_inputs: optional (B, L, d_model) added to each position's input vector (the rating
                task's rating embeddings, :mod:`distill.rating_model`).

        Returns:
            (B, L, d_model). The state at position t summarises items ``<= t`` only.
            Rows at padding positions are zero and carry no meaning.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.cfg.max_len}")

        is_item = input_ids != PAD_ID  # (B, L)
        # Right-aligned positions: the last column is always position max_len - 1.
        positions = torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=input_ids.device)
        x = self.item_vectors(input_ids) * math.sqrt(self.cfg.d_model) + self.pos_emb(positions)
        if extra_inputs is not None:
            x = x + extra_inputs
        x = self.emb_dropout(x)

        attn_mask = self._attention_mask(is_item)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, attn_mask, use_reentrant=False) if recompute else block(x, attn_mask)
        x = self.ln_final(x)
        # Zero the padding rows so nothing downstream can come to depend on them.
        return x * is_item.unsqueeze(-1).to(x.dtype)

    def item_vectors(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (..., d_model) rows of the (tied) item table; through a module call, so ZeRO-3 gathers it."""
        return self.item_emb(item_ids) if self.item_table is None else F.embedding(item_ids, self.item_table())

    @staticmethod
    def _attention_mask(is_item: torch.Tensor) -> torch.Tensor:
        """(B, L) bool -> (B, 1, L, L) bool; True where query i may attend to key j.

        Query i sees keys j <= i (causal) that are real items (key padding mask). A
        padding query would then see no key at all and softmax over an empty set is NaN,
        so every position may also attend to itself; padding rows are discarded anyway.
        """
        L = is_item.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=is_item.device).tril()
        self_only = torch.eye(L, dtype=torch.bool, device=is_item.device)
        allowed = (causal & is_item[:, None, :]) | self_only  # (B, L, L)
        return allowed.unsqueeze(1)  # broadcast over heads

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Catalog scores for hidden states.

        Args:
            hidden: (..., d_model).

        Returns:
            (..., num_items + 1); column 0 (padding) holds the dtype's most negative
            finite value so it is never ranked and gets zero probability.
        """
        logits = self.output(hidden) if self.item_table is None else hidden @ self.item_table().T
        # In place, one column: a masked_fill over the (positions, catalog) matrix copied all of it (the
        # product's backward does not need its output, so writing into it is safe for autograd).
        logits[..., PAD_ID] = torch.finfo(logits.dtype).min
        return logits

    def last_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, d_model), the state after the most recent item."""
        return self.forward(input_ids)[:, -1]

    def score_last(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, num_items + 1) next-item scores."""
        return self.scores(self.last_hidden(input_ids))
