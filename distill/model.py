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

from distill.config import ModelConfig

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

    def __init__(self, cfg: ModelConfig, num_items: int):
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_emb = _Embedding(num_items + 1, cfg.d_model, padding_idx=PAD_ID)
        self.pos_emb = _Embedding(cfg.max_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.output = _Linear(cfg.d_model, num_items + 1, bias=False)
        if cfg.tied_embeddings:
            # Share the Parameter itself (not a copy): scores are hidden @ item_emb.T.
            self.output.weight = self.item_emb.weight

    @property
    def num_scores(self) -> int:
        """Width of a score vector: ``num_items + 1`` (column 0 is padding)."""
        return self.num_items + 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of every position.

        Args:
            input_ids: (B, L) int64, left-padded with 0, ``L <= max_len``.

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
        x = self.item_emb(input_ids) * math.sqrt(self.cfg.d_model) + self.pos_emb(positions)
        x = self.emb_dropout(x)

        attn_mask = self._attention_mask(is_item)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_final(x)
        # Zero the padding rows so nothing downstream can come to depend on them.
        return x * is_item.unsqueeze(-1).to(x.dtype)

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
        logits = self.output(hidden)
        pad_column = torch.zeros(self.num_scores, dtype=torch.bool, device=logits.device)
        pad_column[PAD_ID] = True
        return logits.masked_fill(pad_column, torch.finfo(logits.dtype).min)

    def last_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, d_model), the state after the most recent item."""
        return self.forward(input_ids)[:, -1]

    def score_last(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, num_items + 1) next-item scores."""
        return self.scores(self.last_hidden(input_ids))
