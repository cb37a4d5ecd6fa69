"""Hierarchical prediction heads: one head per taxonomy level, coarse to fine, with a joint loss.

Couplings:
- "parallel": every head reads the same encoding h (the Airbnb destination pattern);
- "cascade": the head of level l reads h + P_l · p_{l-1}, where p_{l-1} is the probability vector of
  the previous (coarser) head and P_l a learned projection, so a fine prediction is conditioned on
  the coarse one (the HierSRec pattern). Gradients flow through p_{l-1}.

The leaf head (finest taxonomy level) scores every leaf by a dot product with leaf vectors given
at call time (tied to the model's input embeddings) plus a bias, or with its own linear layer.
Coarser heads are linear layers over their level's nodes.

Loss: Σ_l w_l · CE_l over the targets' ancestors at each head's level, plus, when
`consistency_weight > 0`, that weight times Σ over consecutive head pairs (coarse c, fine f) of
KL(p_c ‖ q_c), where q_c is the fine head's probability mass summed up to level c (index_add over
the fine level's ancestor table), so the heads agree on the coarse distribution.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.sequence.losses import softmax_cross_entropy

Coupling = Literal["parallel", "cascade"]


class HierarchicalHeads(nn.Module):
    def __init__(self, taxonomy: Taxonomy, levels: Sequence[str], dim: int, *, coupling: Coupling = "cascade",
                 loss_weights: dict[str, float] | None = None, consistency_weight: float = 0.0,
                 tied_leaf_head: bool = True):
        super().__init__()
        if not levels:
            raise ValueError("at least one head level is needed")
        indices = [taxonomy.level_index(level) for level in levels]
        if indices != sorted(set(indices)):
            raise ValueError(f"head levels must be distinct and ordered coarse to fine: {list(levels)}")
        if coupling not in ("parallel", "cascade"):
            raise ValueError(f"coupling must be 'parallel' or 'cascade', got {coupling!r}")
        unknown = set(loss_weights or {}) - set(levels)
        if unknown:
            raise ValueError(f"loss weights for levels without a head: {sorted(unknown)}")
        self.taxonomy = taxonomy
        self.levels = list(levels)
        self.coupling = coupling
        self.loss_weights = {level: float((loss_weights or {}).get(level, 1.0)) for level in self.levels}
        self.consistency_weight = float(consistency_weight)
        self.has_leaf_head = self.levels[-1] == taxonomy.leaf_level
        self.tied_leaf_head = tied_leaf_head and self.has_leaf_head

        self.heads = nn.ModuleDict()
        for level in self.levels:
            if level == taxonomy.leaf_level and self.tied_leaf_head:
                continue
            self.heads[level] = nn.Linear(dim, taxonomy.n_nodes(level))
        if self.tied_leaf_head:
            self.leaf_bias = nn.Parameter(torch.zeros(taxonomy.n_leaves))
        self.cascade = nn.ModuleDict()
        if coupling == "cascade":
            for coarse, fine in zip(self.levels, self.levels[1:]):
                self.cascade[fine] = nn.Sequential(nn.Linear(taxonomy.n_nodes(coarse), dim, bias=False),
                                                   nn.LayerNorm(dim))
        # Each leaf's node at every level (targets per head) and, for consecutive heads, each fine
        # node's coarse ancestor (for the consistency term). Derived from the taxonomy: not saved.
        self.register_buffer("leaf_ancestors", torch.from_numpy(taxonomy.leaf_ancestors.copy()), persistent=False)
        for coarse, fine in zip(self.levels, self.levels[1:]):
            parent = taxonomy.node_ancestors(range(taxonomy.n_nodes(fine)), fine, coarse)
            self.register_buffer(self._parent_key(fine), torch.from_numpy(parent), persistent=False)

    @staticmethod
    def _parent_key(level: str) -> str:
        return f"coarse_parent_of_{level}"

    def forward(self, hidden: torch.Tensor, leaf_vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """hidden [M, D] -> {level: logits [M, n_nodes(level)]}; leaf_vectors [n_leaves, D] for a tied leaf head."""
        logits: dict[str, torch.Tensor] = {}
        previous = None
        for level in self.levels:
            h = hidden
            if previous is not None and self.coupling == "cascade":
                h = hidden + self.cascade[level](torch.softmax(logits[previous], dim=-1))
            if level == self.taxonomy.leaf_level and self.tied_leaf_head:
                if leaf_vectors is None:
                    raise ValueError("a tied leaf head needs leaf_vectors")
                logits[level] = torch.addmm(self.leaf_bias, h, leaf_vectors.T)
            else:
                logits[level] = self.heads[level](h)
            previous = level
        return logits

    def targets(self, leaf_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head level's target node for leaf targets [M]."""
        return {level: self.leaf_ancestors[leaf_targets, self.taxonomy.level_index(level)] for level in self.levels}

    def aggregate(self, fine_probabilities: torch.Tensor, fine: str, coarse_size: int) -> torch.Tensor:
        """Sum a fine head's probabilities [M, n_fine] up to the coarse head's nodes [M, n_coarse]."""
        parent = getattr(self, self._parent_key(fine))
        out = fine_probabilities.new_zeros(fine_probabilities.shape[0], coarse_size)
        return out.index_add_(1, parent, fine_probabilities)

    def consistency(self, log_probabilities: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over consecutive heads of KL(p_coarse ‖ fine mass summed to the coarse level), mean over
        rows; takes each head's log-probabilities (log_softmax of its logits)."""
        total = log_probabilities[self.levels[0]].new_zeros(())
        for coarse, fine in zip(self.levels, self.levels[1:]):
            coarse_log_p = log_probabilities[coarse]
            mass = self.aggregate(log_probabilities[fine].exp(), fine, coarse_log_p.shape[1])
            total = total + F.kl_div(mass.clamp_min(1e-12).log(), coarse_log_p, log_target=True,
                                     reduction="batchmean")
        return total

    def loss(self, logits: dict[str, torch.Tensor], leaf_targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Joint loss over M target rows; parts are the per-level cross-entropies and the consistency term."""
        targets = self.targets(leaf_targets)
        total = logits[self.levels[0]].new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        for level in self.levels:
            cross_entropy = softmax_cross_entropy(logits[level], targets[level])
            total = total + self.loss_weights[level] * cross_entropy
            parts[f"ce_{level}"] = float(cross_entropy.detach())
        if self.consistency_weight > 0 and len(self.levels) > 1:
            log_probabilities = {level: torch.log_softmax(value.float(), dim=-1) for level, value in logits.items()}
            consistency = self.consistency(log_probabilities)
            total = total + self.consistency_weight * consistency
            parts["consistency"] = float(consistency.detach())
        return total, parts
