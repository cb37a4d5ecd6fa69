"""PLE: progressive layered extraction (Tang et al., RecSys 2020): stacked CGC layers, each with
task-specific and shared experts; every layer but the last also passes a shared representation up."""

from __future__ import annotations

import torch

from hmtrec.models.ranking.base import RankingModel, RankingParams
from hmtrec.models.ranking.blocks import CGC, Towers
from hmtrec.models.registry import register_model


class PLEParams(RankingParams):
    n_levels: int = 2
    n_shared_experts: int = 2
    n_specific_experts: int = 1
    expert_hidden: list[int] = [256, 128]


class PLE(RankingModel):
    def __init__(self, params: PLEParams, layout, loss=None):
        super().__init__(params, layout, loss)
        n_tasks = len(self.task_names)
        layers, in_dim = [], self.input_dim
        for level in range(params.n_levels):
            last = level == params.n_levels - 1
            layers.append(CGC(in_dim, n_tasks, params.n_shared_experts, params.n_specific_experts,
                              params.expert_hidden, params.dropout, shared_output=not last))
            in_dim = params.expert_hidden[-1]
        self.layers = torch.nn.ModuleList(layers)
        self.towers = Towers(n_tasks, in_dim, params.tower_hidden, params.dropout)

    def task_logits(self, batch):
        branch_inputs = self.embed(batch).unsqueeze(1)          # [B, 1 group, in]
        shared = None
        for layer in self.layers[:-1]:
            branch_inputs, shared = layer(branch_inputs, shared)  # [B, 1, K, D], [B, 1, D]
        logits = self.towers(self.layers[-1](branch_inputs, shared).squeeze(1))
        return {name: logits[:, i] for i, name in enumerate(self.task_names)}


@register_model("ranking", "ple", params=PLEParams)
def build_ple(params, *, layout, loss=None, **_):
    return PLE(params, layout, loss)
