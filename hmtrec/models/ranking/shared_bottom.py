"""Shared-Bottom: one MLP shared by every task, then one tower per task (Caruana, 1997)."""

from __future__ import annotations

from hmtrec.models.ranking.base import RankingModel, RankingParams
from hmtrec.models.ranking.blocks import MLP, Towers
from hmtrec.models.registry import register_model


class SharedBottomParams(RankingParams):
    bottom_hidden: list[int] = [256, 128]


class SharedBottom(RankingModel):
    def __init__(self, params: SharedBottomParams, layout, loss=None):
        super().__init__(params, layout, loss)
        self.bottom = MLP(self.input_dim, params.bottom_hidden, params.dropout)
        self.towers = Towers(len(self.task_names), self.bottom.output_dim, params.tower_hidden, params.dropout)

    def task_logits(self, batch):
        logits = self.towers(self.bottom(self.embed(batch)))
        return {name: logits[:, i] for i, name in enumerate(self.task_names)}


@register_model("ranking", "shared_bottom", params=SharedBottomParams)
def build_shared_bottom(params, *, layout, loss=None, **_):
    return SharedBottom(params, layout, loss)
