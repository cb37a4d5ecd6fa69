"""A causal Transformer over a sequence of token vectors (pre-LayerNorm, learned positions).

Input: token vectors `x [B, T, D]` and `valid [B, T]` (False at padding). Output: `[B, T, D]`, where
position t has seen tokens 0..t only. Padding keys are masked out of attention, so an output at a
real position never depends on padding wherever the padding sits; outputs at padded positions
are meaningless and callers ignore them.

With `last [B]` (one position per row, e.g. each history's last event) the output is that
position's vector only, `[B, D]`: the final block then runs its queries, output projection and
feed-forward for those B positions alone (its keys and values still come from every position),
the same values for a fraction of the final block's cost. Serving scores one position per history.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = dropout
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """allowed [B, 1, T, T]: True where query t may attend to key s. With `queries [B, D]` (one
        query vector per row, keys and values from x): allowed [B, 1, 1, T], output [B, D]."""
        batch, length, dim = x.shape
        if queries is None:
            q, k, v = self.qkv(x).split(dim, dim=2)
        else:
            q = F.linear(queries[:, None], self.qkv.weight[:dim], self.qkv.bias[:dim])
            k, v = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).split(dim, dim=2)
        q, k, v = (t.reshape(batch, t.shape[1], self.n_heads, dim // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, q.shape[2], dim)
        y = self.residual_dropout(self.out(y))
        return y if queries is None else y[:, 0]


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, expansion: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(),
                                 nn.Linear(expansion * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """x + attention(LN(x)), then x + feed-forward(LN(x))."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, n_heads, dropout)
        self.norm_feed_forward = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x), allowed)
        return x + self.feed_forward(self.norm_feed_forward(x))

    def at(self, x: torch.Tensor, allowed: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The block's output at one position per row: x [B, T, D], allowed [B, 1, 1, T] (that
        position's row of the mask), last [B] -> [B, D]."""
        rows = torch.arange(x.shape[0], device=x.device)
        normed = self.norm_attention(x)
        h = x[rows, last] + self.attention(normed, allowed, queries=normed[rows, last])
        return h + self.feed_forward(self.norm_feed_forward(h))


class CausalTransformer(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, dropout: float, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, n_heads, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """-> [B, T, D]; with `last [B]`, each row's output at that position only, [B, D]."""
        batch, length, _ = x.shape
        if length > self.max_len:
            raise ValueError(f"sequence window of {length} positions exceeds max_len {self.max_len}")
        position = torch.arange(length, device=x.device)
        causal = position[None, :] <= position[:, None]                       # [T, T]: key s <= query t
        # A query always sees itself, so a row of padding never has every key masked (NaN softmax).
        # (the diagonal as a comparison, not torch.eye: ONNX Runtime has no boolean EyeLike)
        allowed = (causal[None] & valid[:, None, :]) | (position[None, :] == position[:, None])
        h = self.input_dropout(x + self.positions(position)[None])
        if last is None or not len(self.blocks):
            for block in self.blocks:
                h = block(h, allowed[:, None])
            h = self.final_norm(h)
            return h if last is None else h[torch.arange(batch, device=x.device), last]
        for block in self.blocks[:-1]:
            h = block(h, allowed[:, None])
        rows = torch.arange(batch, device=x.device)
        return self.final_norm(self.blocks[-1].at(h, allowed[rows, last][:, None, None], last))
