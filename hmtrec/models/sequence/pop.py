"""POP: rank every node of every taxonomy level by how often it occurs in the training events.

The history is ignored, so every query gets the same scores. Scores are log relative
frequencies, so a softmax over them gives back the popularity distribution (like every model's
scores, they act as logits); a node never seen in training gets a floor far below any seen one.
Ties keep the evaluator's rule (lower index first). The counts are buffers, saved like weights.
"""

from __future__ import annotations

import numpy as np
import torch

from hmtrec.config import StrictModel
from hmtrec.data.sequences import SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.families import GEO_ACTIONS, SEQUENCE_WINDOWS
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender, target_positions


UNSEEN_COUNT = 1e-6  # the count an unseen node is scored with (keeps log finite)


class PopParams(StrictModel):
    """POP has no parameters."""


class Popularity(SequenceRecommender):
    trainable = False
    # it reads only how many targets a batch has, so it scores geo action-stream examples too
    batch_contracts = (SEQUENCE_WINDOWS, GEO_ACTIONS)

    def __init__(self, taxonomy: Taxonomy):
        super().__init__(taxonomy)
        for level in range(taxonomy.n_levels):
            self.register_buffer(self._key(level), torch.zeros(taxonomy.n_nodes(level), dtype=torch.float64))

    @staticmethod
    def _key(level: int) -> str:
        return f"counts_level{level}"

    @property
    def levels(self) -> list[str]:
        return list(self.taxonomy.level_names)

    def counts(self, level: int | str) -> torch.Tensor:
        return getattr(self, self._key(self.taxonomy.level_index(level)))

    def fit(self, train: SequenceData) -> None:
        leaf_counts = np.bincount(train.leaves, minlength=self.taxonomy.n_leaves).astype(np.float64)
        for level in range(self.taxonomy.n_levels):
            node_counts = np.bincount(self.taxonomy.ancestor_table(level), weights=leaf_counts,
                                      minlength=self.taxonomy.n_nodes(level))
            self.counts(level).copy_(torch.from_numpy(node_counts))

    def log_frequencies(self, level: int | str) -> torch.Tensor:
        counts = self.counts(level)
        return (counts.clamp_min(UNSEEN_COUNT) / counts.sum().clamp_min(1.0)).log().float()

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n_targets = int(target_positions(batch).sum())
        # A real [M, n] tensor, not an expanded view: callers may mask scores in place.
        return {level: self.log_frequencies(level)[None, :].repeat(n_targets, 1) for level in self.levels}


@register_model("sequence", "pop", params=PopParams)
def build_pop(params: PopParams, *, taxonomy: Taxonomy, **context) -> Popularity:
    return Popularity(taxonomy)
