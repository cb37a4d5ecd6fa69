"""HiNet: hierarchical information extraction network (Zhou et al., ICDE 2023, arXiv 2303.06095).

Two extraction layers:
1. Scenario extraction: a scenario-shared expert block, one scenario-specific expert block per
   scenario (experts + gate each), and a scenario-aware attentive network (SAN) that, from the
   row's scenario embedding, weights the *other* scenarios' specific representations. The row's
   representation is [shared ; own scenario's specific ; SAN mix of the others].
2. Task extraction: a CGC layer (task-specific and task-shared experts) on that representation,
   then one tower per task.

Every scenario block is evaluated for every row in one batched product (scenarios are few), then
the row's own block is gathered; the SAN gives its own scenario weight exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn

from hmtrec.models.ranking.base import RankingModel, RankingParams
from hmtrec.models.ranking.blocks import CGC, Towers, mix
from hmtrec.models.registry import register_model


class HiNetParams(RankingParams):
    n_scenario_shared_experts: int = 2
    n_scenario_specific_experts: int = 2      # per scenario
    scenario_expert_hidden: list[int] = [256, 128]
    san_embedding_dim: int = 16               # the scenario embedding the SAN attends from
    n_task_shared_experts: int = 2
    n_task_specific_experts: int = 1
    task_expert_hidden: list[int] = [128, 64]


class HiNet(RankingModel):
    def __init__(self, params: HiNetParams, layout, loss=None):
        super().__init__(params, layout, loss)
        if layout.scenario is None:
            raise ValueError("HiNet needs a scenario column (features.scenario)")
        n_scenarios = self.n_scenarios = layout.n_scenarios
        hidden = params.scenario_expert_hidden
        # the scenario-shared block: shared experts and one gate (a one-branch CGC without specific experts)
        self.scenario_shared = CGC(self.input_dim, 1, params.n_scenario_shared_experts, 0, hidden, params.dropout)
        # one block per scenario, each its own experts and gate (a CGC without shared experts);
        # scenario k's experts are experts [k * n, (k + 1) * n) of `scenario_specific.specific`
        self.scenario_specific = CGC(self.input_dim, n_scenarios, 0, params.n_scenario_specific_experts, hidden,
                                     params.dropout)
        self.san_embedding = nn.Embedding(n_scenarios, params.san_embedding_dim)
        self.san_scores = nn.Linear(params.san_embedding_dim, n_scenarios)
        representation_dim = 3 * hidden[-1]
        self.task_layer = CGC(representation_dim, len(self.task_names), params.n_task_shared_experts,
                              params.n_task_specific_experts, params.task_expert_hidden, params.dropout)
        self.towers = Towers(len(self.task_names), params.task_expert_hidden[-1], params.tower_hidden, params.dropout)

    def scenario_attention(self, scenario: torch.Tensor) -> torch.Tensor:
        """SAN weights [B, n_scenarios] over the other scenarios; the row's own scenario gets 0."""
        scores = self.san_scores(self.san_embedding(scenario))
        own = nn.functional.one_hot(scenario, self.n_scenarios).bool()
        if self.n_scenarios == 1:
            return torch.zeros_like(scores)
        return torch.softmax(scores.masked_fill(own, float("-inf")), dim=-1)

    def scenario_representation(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        shared = self.scenario_shared(x).squeeze(1)                            # [B, D]
        per_scenario = self.scenario_specific(x)                               # [B, K, D]
        own = per_scenario[torch.arange(x.shape[0], device=x.device), scenario]
        others = mix(per_scenario, self.scenario_attention(scenario))
        return torch.cat([shared, own, others], dim=1)

    def task_logits(self, batch):
        x = self.embed(batch)
        representation = self.scenario_representation(x, batch["scenario"])
        logits = self.towers(self.task_layer(representation))
        return {name: logits[:, i] for i, name in enumerate(self.task_names)}


@register_model("ranking", "hinet", params=HiNetParams)
def build_hinet(params, *, layout, loss=None, **_):
    return HiNet(params, layout, loss)
