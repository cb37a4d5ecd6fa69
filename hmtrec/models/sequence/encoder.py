"""A causal Transformer over a sequence of token vectors (pre-LayerNorm, learned positions).

Input: token vectors `x [B, T, D]` and `valid [B, T]` (False at padding). Output: `[B, T, D]`, where
position t has seen tokens 0..t only. Padding keys are masked out of attention, so an output at a
real position never depends on padding wherever the padding sits; outputs at padded positions
are meaningless and callers ignore them.
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

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """allowed [B, 1, T, T]: True where query t may attend to key s."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, dim)
        return self.residual_dropout(self.out(y))


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


class CausalTransformer(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, dropout: float, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, n_heads, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        if length > self.max_len:
            raise ValueError(f"sequence window of {length} positions exceeds max_len {self.max_len}")
        position = torch.arange(length, device=x.device)
        causal = position[None, :] <= position[:, None]                       # [T, T]: key s <= query t
        # A query always sees itself, so a row of padding never has every key masked (NaN softmax).
        # (the diagonal as a comparison, not torch.eye: ONNX Runtime has no boolean EyeLike)
        allowed = (causal[None] & valid[:, None, :]) | (position[None, :] == position[:, None])
        h = self.input_dropout(x + self.positions(position)[None])
        for block in self.blocks:
            h = block(h, allowed[:, None])
        return self.final_norm(h)
