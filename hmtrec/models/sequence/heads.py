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

Options of the leaf head (each a switch, off by default):
- `leaf_scale` (NISER, Gupta et al. 2019): leaf logits are scale · cos(h, v_i) + b_i, the session
  encoding and every leaf vector normalised to unit length, so popular items cannot win by norm;
- `factorized` (item scores through the category): p(i) = p(c(i)) · p(i | c(i)), with p(c) the
  softmax of the finest coarse head and p(i | c) a softmax of the leaf logits over the leaves of c
  only; the leaf loss is -log p(i) and `scores` ranks by log p(i);
- `coarse_weight_final` with `coarse_weight_steps` (a schedule for the coarse-loss weight): every
  coarser head's loss weight moves linearly from its `loss_weights` value to the final one over the
  first `coarse_weight_steps` training steps (loss calls in training mode, counted in a saved
  buffer, so a resumed run continues the schedule), then stays there: the coarse heads can shape
  the encoder early and give way to the item head later;
- `sibling_smoothing` ε (taxonomy-aware soft targets, "Making Better Mistakes", Bertinetto et
  al. 2020): the leaf target puts 1-ε on the item and ε spread evenly over its siblings (the other
  leaves under its parent node; all of ε stays on the item when it has none). For a softmax, the
  cross-entropy against that target is CE(y) + ε · (s_y - mean of the siblings' logits), which is
  how it is computed (no dense target matrix).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.sequence.losses import linear_cross_entropy_rows, softmax_cross_entropy, softmax_cross_entropy_rows

Coupling = Literal["parallel", "cascade"]


def grouped_log_sum_exp(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[M, N] values, group [N] (each column's group in 0..n_groups-1) -> [M, n_groups]: log Σ exp
    over each group's columns (shifted by the group's max, so no group's sum underflows; -inf for
    an empty group)."""
    index = group.expand(values.shape[0], -1)
    group_max = values.new_full((values.shape[0], n_groups), float("-inf"))
    group_max = group_max.scatter_reduce(1, index, values.detach(), "amax")
    shifted = (values - group_max.gather(1, index)).exp()
    sums = shifted.new_zeros(group_max.shape).index_add_(1, group, shifted)
    return group_max + sums.float().log()


class HierarchicalHeads(nn.Module):
    def __init__(self, taxonomy: Taxonomy, levels: Sequence[str], dim: int, *, coupling: Coupling = "cascade",
                 loss_weights: dict[str, float] | None = None, consistency_weight: float = 0.0,
                 tied_leaf_head: bool = True, leaf_scale: float | None = None, factorized: bool = False,
                 sibling_smoothing: float = 0.0, coarse_weight_final: float | None = None,
                 coarse_weight_steps: int = 0):
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
        self.sparse_leaf_head = False   # an untied item head's sampled lookups give sparse gradients
        if (leaf_scale is not None or factorized or sibling_smoothing) and not self.has_leaf_head:
            raise ValueError("leaf_scale, factorized and sibling_smoothing need a leaf head")
        if factorized and len(self.levels) < 2:
            raise ValueError("factorized leaf scores need a coarser head to factorise through")
        if not 0.0 <= sibling_smoothing < 1.0:
            raise ValueError(f"sibling_smoothing must lie in [0, 1), got {sibling_smoothing}")
        if coarse_weight_final is not None and (coarse_weight_final < 0 or coarse_weight_steps < 1):
            raise ValueError("a coarse-weight schedule needs coarse_weight_final >= 0 and coarse_weight_steps >= 1")
        self.coarse_weight_final = None if coarse_weight_final is None else float(coarse_weight_final)
        self.coarse_weight_steps = int(coarse_weight_steps)
        if self.coarse_weight_final is not None:   # only then: older weights files have no such entry
            self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))
        self.leaf_scale = None if leaf_scale is None else float(leaf_scale)
        self.factorized = bool(factorized)
        self.sibling_smoothing = float(sibling_smoothing)

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
        if self.sibling_smoothing:
            # each leaf's parent node (the level just above the leaves) and the leaves under it
            parent = torch.from_numpy(taxonomy.ancestor_table(taxonomy.level_names[-2]).copy())
            self.register_buffer("sibling_parent", parent, persistent=False)
            self.register_buffer("sibling_counts", torch.bincount(parent, minlength=taxonomy.n_nodes(-2)),
                                 persistent=False)

    @staticmethod
    def _parent_key(level: str) -> str:
        return f"coarse_parent_of_{level}"

    def forward(self, hidden: torch.Tensor, leaf_vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """hidden [M, D] -> {level: logits [M, n_nodes(level)]}; leaf_vectors [n_leaves, D] for a tied leaf head."""
        logits, leaf_query = self.coarse_and_leaf_query(hidden)
        if leaf_query is not None:
            if self.tied_leaf_head:
                if leaf_vectors is None:
                    raise ValueError("a tied leaf head needs leaf_vectors")
                weight, bias = leaf_vectors, self.leaf_bias
            else:
                weight, bias = self.heads[self.taxonomy.leaf_level].weight, self.heads[self.taxonomy.leaf_level].bias
            logits[self.taxonomy.leaf_level] = self._leaf_logits(leaf_query, weight, bias)
        return logits

    def coarse_and_leaf_query(self, hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """hidden [M, D] -> ({coarse level: logits}, the leaf head's input [M, D], or None without a
        leaf head). Serving scores candidate leaves from that input without the full leaf matrix."""
        logits: dict[str, torch.Tensor] = {}
        previous = None
        for level in self.levels:
            h = hidden
            if previous is not None and self.coupling == "cascade":
                h = hidden + self.cascade[level](torch.softmax(logits[previous], dim=-1))
            if level == self.taxonomy.leaf_level:
                return logits, h
            logits[level] = self.heads[level](h)
            previous = level
        return logits, None

    def _leaf_logits(self, h: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.leaf_scale is None:
            return torch.addmm(bias, h, vectors.T)
        h, vectors = F.normalize(h, dim=-1), F.normalize(vectors, dim=-1)
        return torch.addmm(bias, h, vectors.T, alpha=self.leaf_scale)

    # ---- the leaf distribution --------------------------------------------------------------

    def _within_parent_log_sum_exp(self, leaf_logits: torch.Tensor) -> torch.Tensor:
        """[M, n_parent]: log Σ exp(leaf logits) over the leaves under each node of the head just
        above the leaves (shifted by each node's max, so no node's sum underflows)."""
        parent_level = self.levels[-2]
        parent = self.leaf_ancestors[:, self.taxonomy.level_index(parent_level)]
        return grouped_log_sum_exp(leaf_logits, parent, self.taxonomy.n_nodes(parent_level))

    def leaf_log_probabilities(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(item) [M, n_leaves] under the leaf head (factorised through the coarse head when
        `factorized`)."""
        leaf_logits = logits[self.taxonomy.leaf_level].float()
        if not self.factorized:
            return torch.log_softmax(leaf_logits, dim=-1)
        parent_level = self.levels[-2]
        parent = self.leaf_ancestors[:, self.taxonomy.level_index(parent_level)]
        coarse_log_p = torch.log_softmax(logits[parent_level].float(), dim=-1)
        within = self._within_parent_log_sum_exp(leaf_logits)
        return coarse_log_p[:, parent] + leaf_logits - within[:, parent]

    def leaf_row_nll(self, logits: dict[str, torch.Tensor], leaf_targets: torch.Tensor) -> torch.Tensor:
        """-log p(target item) per row [M] (float32) under the leaf head, without soft targets."""
        leaf_logits = logits[self.taxonomy.leaf_level]
        if not self.factorized:
            return softmax_cross_entropy_rows(leaf_logits, leaf_targets)
        parent_level = self.levels[-2]
        target_parent = self.leaf_ancestors[leaf_targets, self.taxonomy.level_index(parent_level)]
        coarse_nll = softmax_cross_entropy_rows(logits[parent_level], target_parent)
        within = self._within_parent_log_sum_exp(leaf_logits.float())
        target_logit = leaf_logits.gather(1, leaf_targets[:, None]).squeeze(1).float()
        return coarse_nll + within.gather(1, target_parent[:, None]).squeeze(1) - target_logit

    def sampled_leaf_row_nll(self, logits: dict[str, torch.Tensor], leaf_query: torch.Tensor,
                             leaf_targets: torch.Tensor, candidates: torch.Tensor, target_column: torch.Tensor,
                             log_q: torch.Tensor, candidate_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """`leaf_row_nll` under the sampled softmax (`losses.sample_item_candidates`): the leaf
        logits of the candidates only, lowered by their log-Q correction. Factorised: the coarse
        head's exact -log p(c) plus -log p(item | c) over the candidates under the target's parent c
        (the target is always one of them). `candidate_vectors`: the candidates' leaf vectors, for a
        tied leaf head. logits: the coarse heads'; leaf_query [M, D] -> [M] float32."""
        if self.tied_leaf_head:
            weight, bias = candidate_vectors, self.leaf_bias[candidates]
        else:
            head = self.heads[self.taxonomy.leaf_level]
            # a sparse-gradient lookup under train.sparse_updates (the same rows, another gradient layout)
            weight = F.embedding(candidates, head.weight, sparse=True) if self.sparse_leaf_head \
                else head.weight[candidates]
            bias = head.bias[candidates]
        if not self.factorized:
            # the log-Q correction folded into the bias; the [M, C] logits are never held whole
            if self.leaf_scale is not None:
                leaf_query = F.normalize(leaf_query, dim=-1) * self.leaf_scale
                weight = F.normalize(weight, dim=-1)
            return linear_cross_entropy_rows(leaf_query, weight, bias - log_q.to(bias.dtype), target_column)
        leaf_logits = self._leaf_logits(leaf_query, weight, bias)
        leaf_logits = leaf_logits - log_q.to(leaf_logits.dtype)
        parent_level = self.levels[-2]
        level = self.taxonomy.level_index(parent_level)
        target_parent = self.leaf_ancestors[leaf_targets, level]
        other_parent = self.leaf_ancestors[candidates, level][None, :] != target_parent[:, None]
        within = leaf_logits.masked_fill(other_parent, float("-inf"))
        return softmax_cross_entropy_rows(logits[parent_level], target_parent) + \
            softmax_cross_entropy_rows(within, target_column)

    def sibling_term(self, leaf_logits: torch.Tensor, leaf_targets: torch.Tensor) -> torch.Tensor:
        """Per row [M]: ε · (s_target - mean logit of the target's siblings); 0 without siblings."""
        parent = self.sibling_parent
        sums = leaf_logits.new_zeros(leaf_logits.shape[0], len(self.sibling_counts), dtype=torch.float32)
        sums = sums.index_add_(1, parent, leaf_logits.float())
        target_parent = parent[leaf_targets]
        target_logit = leaf_logits.gather(1, leaf_targets[:, None]).squeeze(1).float()
        siblings = (self.sibling_counts[target_parent] - 1).float()
        sibling_mean = (sums.gather(1, target_parent[:, None]).squeeze(1) - target_logit) / siblings.clamp_min(1)
        return torch.where(siblings > 0, self.sibling_smoothing * (target_logit - sibling_mean),
                           torch.zeros_like(target_logit))

    def scores(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the heads rank by: the logits, with the leaf level as log p(item) when factorised
        (raw leaf logits rank like their log-softmax)."""
        if not self.factorized:
            return logits
        return {**logits, self.taxonomy.leaf_level: self.leaf_log_probabilities(logits)}

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

    def level_weight(self, level: str) -> float:
        """The loss weight of `level` at the current training step (the schedule acts on coarse heads)."""
        start = self.loss_weights[level]
        if self.coarse_weight_final is None or level == self.taxonomy.leaf_level:
            return start
        progress = min(1.0, int(self.training_steps) / self.coarse_weight_steps)
        return start + (self.coarse_weight_final - start) * progress

    def loss(self, logits: dict[str, torch.Tensor], leaf_targets: torch.Tensor,
             leaf_nll: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Joint loss over M target rows; parts are the per-level cross-entropies and the consistency
        term. `leaf_nll` [M], when given, is the leaf term per row in place of the leaf head's own
        (a model that mixes the leaf head with another distribution, as the copy mechanism does)."""
        targets = self.targets(leaf_targets)
        total = leaf_targets.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        leaf = self.taxonomy.leaf_level
        for level in self.levels:
            if level == leaf and (leaf_nll is not None or self.factorized or self.sibling_smoothing):
                rows = leaf_nll if leaf_nll is not None else self.leaf_row_nll(logits, leaf_targets)
                cross_entropy = rows.mean()
                if self.sibling_smoothing:
                    cross_entropy = cross_entropy + self.sibling_term(logits[leaf], leaf_targets).mean()
            else:
                cross_entropy = softmax_cross_entropy(logits[level], targets[level])
            total = total + self.level_weight(level) * cross_entropy
            parts[f"ce_{level}"] = float(cross_entropy.detach())
        if self.consistency_weight > 0 and len(self.levels) > 1:
            log_probabilities = {level: torch.log_softmax(value.float(), dim=-1) for level, value in logits.items()}
            if self.factorized:
                log_probabilities[leaf] = self.leaf_log_probabilities(logits)
            consistency = self.consistency(log_probabilities)
            total = total + self.consistency_weight * consistency
            parts["consistency"] = float(consistency.detach())
        if self.coarse_weight_final is not None:
            parts["coarse_weight"] = self.level_weight(self.levels[0]) if len(self.levels) > 1 else 0.0
            if self.training:
                self.training_steps += 1
        return total, parts
