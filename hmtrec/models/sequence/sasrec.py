"""SASRec (Kang & McAuley, ICDM 2018), single task, trained with full softmax cross-entropy.

Item-id embeddings (scaled by sqrt(dim), as in the paper) plus learned positions go through the
same causal Transformer HierSRec uses (`encoder.CausalTransformer`: pre-LayerNorm blocks, causal
and padding masks), and the output at position t scores every item by dot product with the item
embeddings (shared input/output embedding, as in the paper). The paper's binary cross-entropy
with one sampled negative is replaced by cross-entropy over the whole catalogue, which is
consistently stronger (Klenitskiy & Vasilev, RecSys 2023) and what the other neural models here
use, so the comparison isolates architecture from loss.

SASRec differs from HierSRec with ids only and a single item head by design only in details
(paper-style embedding scaling, no input projection); it is the reference single-task model.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn

from hmtrec.data.sequences import PAD
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender, target_positions
from hmtrec.models.sequence.encoder import CausalTransformer
from hmtrec.models.sequence.losses import ItemLossParams, item_loss


class SASRecParams(ItemLossParams):
    dim: int = Field(64, ge=1, description="Embedding and Transformer width.")
    layers: int = Field(2, ge=1, description="Self-attention blocks.")
    heads: int = Field(1, ge=1, description="Attention heads (the paper uses one); must divide dim.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_len: int | None = Field(
        None, ge=1, description="Longest window (learned positions); default the pipeline's train.max_len.")

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class SASRec(SequenceRecommender):
    def __init__(self, taxonomy: Taxonomy, params: SASRecParams | None = None, max_len: int = 200):
        super().__init__(taxonomy)
        self.params = params = params or SASRecParams()
        self.item_embedding = nn.Embedding(taxonomy.n_leaves, params.dim)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.encoder = CausalTransformer(params.dim, params.layers, params.heads, params.dropout,
                                         params.max_len or max_len)
        self.scale = math.sqrt(params.dim)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, T] (PAD = -1) -> hidden states [B, T, dim]; position t has seen inputs[:, :t+1]."""
        valid = inputs != PAD
        x = self.item_embedding(inputs.clamp(min=0)) * self.scale
        return self.encoder(x * valid[..., None], valid)

    def _target_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(batch["inputs"])[target_positions(batch)]   # gather before the big matmul

    def _target_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._target_hidden(batch) @ self.item_embedding.weight.T

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.taxonomy.leaf_level: self._target_logits(batch)}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        targets = batch["targets"][target_positions(batch)]
        loss = item_loss(self._target_hidden(batch), self.item_embedding.weight, None, targets, self.params)
        return loss, {"cross_entropy": float(loss.detach())}


@register_model("sequence", "sasrec", params=SASRecParams)
def build_sasrec(params: SASRecParams, *, taxonomy: Taxonomy, max_len: int | None = None, **_):
    return SASRec(taxonomy, params, max_len=max_len or 200)
