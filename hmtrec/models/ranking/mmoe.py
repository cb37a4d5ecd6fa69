"""MMoE: multi-gate mixture of experts (Ma et al., KDD 2018). Every task mixes the same experts
with its own softmax gate, then has its own tower. (A CGC layer with only shared experts.)"""

from __future__ import annotations

from hmtrec.models.ranking.base import RankingModel, RankingParams
from hmtrec.models.ranking.blocks import CGC, Towers
from hmtrec.models.registry import register_model


class MMoEParams(RankingParams):
    n_experts: int = 4
    expert_hidden: list[int] = [256, 128]


class MMoE(RankingModel):
    def __init__(self, params: MMoEParams, layout, loss=None):
        super().__init__(params, layout, loss)
        self.experts = CGC(self.input_dim, len(self.task_names), n_shared=params.n_experts, n_specific=0,
                           hidden=params.expert_hidden, dropout=params.dropout)
        self.towers = Towers(len(self.task_names), self.experts.output_dim, params.tower_hidden, params.dropout)

    def task_logits(self, batch):
        logits = self.towers(self.experts(self.embed(batch)))
        return {name: logits[:, i] for i, name in enumerate(self.task_names)}


@register_model("ranking", "mmoe", params=MMoEParams)
def build_mmoe(params, *, layout, loss=None, **_):
    return MMoE(params, layout, loss)
