"""S-POP, session popularity (Hidasi et al., ICLR 2016, as a baseline): recommend the items seen
most often in the current history, ties broken by popularity over all training events.

The score of leaf i after history h is `count(i in h) + 0.5 * pop(i) / (max pop + 1)`: the
popularity term lies in [0, 0.5), so it only orders leaves with equal counts, and leaves never
seen in the history fall back to plain popularity order. Every coarser level is scored the same
way on the history's ancestors (a category's count is the events of h under it), so candidate
generation and category metrics read S-POP's own category scores.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender
from hmtrec.models.sequence.prefixes import target_prefixes


class SessionPopParams(StrictModel):
    max_history: int | None = Field(
        None, ge=1, description="Count only the most recent N events of the history (None: all of the window).")


class SessionPop(SequenceRecommender):
    trainable = False

    def __init__(self, taxonomy: Taxonomy, params: SessionPopParams | None = None):
        super().__init__(taxonomy)
        self.params = params or SessionPopParams()
        for level in range(taxonomy.n_levels):
            self.register_buffer(self._key(level), torch.zeros(taxonomy.n_nodes(level)))

    @staticmethod
    def _key(level: int) -> str:
        return f"tiebreak_level{level}"

    @property
    def levels(self) -> list[str]:
        return list(self.taxonomy.level_names)

    def fit(self, train: SequenceData) -> None:
        for level in range(self.taxonomy.n_levels):
            nodes = self.taxonomy.ancestor_table(level)[train.leaves]
            counts = np.bincount(nodes, minlength=self.taxonomy.n_nodes(level)).astype(np.float64)
            setattr(self, self._key(level), torch.from_numpy(0.5 * counts / (counts.max(initial=0.0) + 1.0)).float())

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefixes = target_prefixes(batch)
        items = prefixes.items
        present = items != PAD
        if self.params.max_history is not None:
            # keep the last max_history events of each prefix: position >= length - max_history
            position = torch.arange(items.shape[1], device=items.device)[None, :]
            present &= position > prefixes.positions[:, None] - self.params.max_history
        safe_items = torch.where(present, items, 0)
        out = {}
        for level, name in enumerate(self.taxonomy.level_names):
            scores = getattr(self, self._key(level)).to(items.device).expand(prefixes.n_queries, -1).clone()
            nodes = self.taxonomy.ancestors(safe_items, level)
            out[name] = scores.scatter_add_(1, nodes, present.to(scores.dtype))
        return out


@register_model("sequence", "spop", params=SessionPopParams)
def build_spop(params: SessionPopParams, *, taxonomy: Taxonomy, **_):
    return SessionPop(taxonomy, params)
