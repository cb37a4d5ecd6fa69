"""MFH: multi-faceted hierarchical multi-task learning (Liu et al., CIKM 2022, arXiv 2110.13365).

Tasks are indexed by several facets, e.g. behaviour (the `task` facet: click, like) x scenario, or
x user group (new / old users), optionally x item group. A tree of *switchers* splits the shared
input facet by facet, level by level: the root switcher has one branch per value of the first
facet, each of its branches feeds a switcher with one branch per value of the second facet, and so
on; a leaf is one combination of facet values, with its own tower. A switcher is a multi-branch
extraction block: CGC (default), PLE (stacked CGC) or MMoE (CGC without specific experts).

With several facet orders (`orders`, by default every rotation of `facets`: [scenario, task] and
[task, scenario]) there are several trees; each leaf's tower is fed by the combination (sum or
mean) of the leaf's paths through all trees, so a leaf shares with its siblings along every facet.

A row is scored, for each task, by the leaf that matches the row's own facet values, so only those
leaves (and the switcher branches on their paths) get gradient from the row: losses are masked by
the row's facet values. All branches are evaluated for every row, the switchers of one tree level
as one grouped CGC (a few batched products), which is cheap while the product of facet sizes
stays small (tens of leaves).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from hmtrec.data.features import TASK_FACET
from hmtrec.models.ranking.base import RankingModel, RankingParams
from hmtrec.models.ranking.blocks import CGC, Towers
from hmtrec.models.registry import register_model


class MFHParams(RankingParams):
    facets: list[str] = ["scenario", TASK_FACET]   # "task" is appended when absent
    orders: Literal["rotations", "declared"] | list[list[str]] = "rotations"
    combine: Literal["sum", "mean"] = "sum"
    switcher: Literal["cgc", "ple", "mmoe"] = "cgc"
    n_shared_experts: int = 2
    n_specific_experts: int = 1                    # per branch (cgc, ple); mmoe uses only shared experts
    ple_levels: int = 2
    level_hidden: list[list[int]] = [[256, 128], [128, 64]]   # expert sizes per tree level (last repeats)


class Switchers(nn.Module):
    """G switchers side by side (one per tree path at a level): [B, G, in] -> [B, G, n_branches, out]."""

    def __init__(self, kind: str, n_groups: int, in_dim: int, n_branches: int, params: MFHParams, hidden: list[int]):
        super().__init__()
        n_specific = 0 if kind == "mmoe" else params.n_specific_experts
        levels = params.ple_levels if kind == "ple" else 1
        self.layers = nn.ModuleList()
        for level in range(levels):
            last = level == levels - 1
            self.layers.append(CGC(in_dim if level == 0 else hidden[-1], n_branches, params.n_shared_experts,
                                   n_specific, hidden, params.dropout, shared_output=not last, n_groups=n_groups))
        self.output_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch_inputs, shared = x, None
        for layer in self.layers[:-1]:
            branch_inputs, shared = layer(branch_inputs, shared)
        return self.layers[-1](branch_inputs, shared)


class FacetTree(nn.Module):
    """Switchers for one facet order; forward returns [B, n_leaves, D] in that order's leaf layout."""

    def __init__(self, sizes: list[int], in_dim: int, params: MFHParams):
        super().__init__()
        self.sizes = sizes
        self.levels = nn.ModuleList()
        n_paths = 1
        for depth, size in enumerate(sizes):
            hidden = params.level_hidden[min(depth, len(params.level_hidden) - 1)]
            self.levels.append(Switchers(params.switcher, n_paths, in_dim, size, params, hidden))
            in_dim = hidden[-1]
            n_paths *= size
        self.output_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = x.unsqueeze(1)                                   # [B, 1, in]
        for switchers in self.levels:
            paths = switchers(paths).flatten(1, 2)               # [B, n_paths * size, D]
        return paths


class MFH(RankingModel):
    def __init__(self, params: MFHParams, layout, loss=None):
        super().__init__(params, layout, loss)
        facets = list(params.facets) + ([] if TASK_FACET in params.facets else [TASK_FACET])
        if len(set(facets)) != len(facets):
            raise ValueError(f"MFH facets repeat a name: {facets}")
        self.facets = facets
        self.sizes = [len(layout.facet_values(f)) for f in facets]
        if params.orders == "rotations":
            orders = [facets[i:] + facets[:i] for i in range(len(facets))]
        elif params.orders == "declared":
            orders = [facets]
        else:
            orders = [list(order) for order in params.orders]
            for order in orders:
                if sorted(order) != sorted(facets):
                    raise ValueError(f"MFH order {order} is not a permutation of the facets {facets}")
        self.orders = orders
        self.trees = nn.ModuleList([FacetTree([self.sizes[facets.index(f)] for f in order], self.input_dim, params)
                                    for order in orders])
        self.n_leaves = math.prod(self.sizes)
        self.towers = Towers(self.n_leaves, self.trees[0].output_dim, params.tower_hidden, params.dropout)
        strides = [math.prod(self.sizes[i + 1:]) for i in range(len(facets))]
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.long), persistent=False)
        self._task_position = facets.index(TASK_FACET)

    def _canonical(self, leaves: torch.Tensor, order: list[str]) -> torch.Tensor:
        """Re-lay a tree's leaves [B, n_leaves, D] from `order` into the declared facet order."""
        sizes = [self.sizes[self.facets.index(f)] for f in order]
        grid = leaves.view(leaves.shape[0], *sizes, leaves.shape[-1])
        permutation = [0] + [1 + order.index(f) for f in self.facets] + [len(order) + 1]
        return grid.permute(*permutation).reshape(leaves.shape)

    def facet_codes(self, batch: dict) -> torch.Tensor:
        """The row's value of every facet, [B, n_facets]; the task facet is left 0 (filled per task)."""
        columns = []
        for facet in self.facets:
            if facet == TASK_FACET:
                columns.append(torch.zeros_like(batch["labels"][:, 0], dtype=torch.long))
            elif facet in self.layout.facets:
                columns.append(batch["facets"][:, list(self.layout.facets).index(facet)])
            else:                                                # the scenario column
                columns.append(batch["scenario"])
        return torch.stack(columns, dim=1)

    def leaf_index(self, batch: dict) -> torch.Tensor:
        """[B, n_tasks]: the leaf that scores each (row, task)."""
        base = (self.facet_codes(batch) * self.strides).sum(1, keepdim=True)
        tasks = torch.arange(len(self.task_names), device=base.device)
        return base + tasks * self.strides[self._task_position]

    def task_logits(self, batch):
        x = self.embed(batch)
        combined = sum(self._canonical(tree(x), order) for tree, order in zip(self.trees, self.orders))
        if self.params.combine == "mean":
            combined = combined / len(self.trees)
        leaf_logits = self.towers(combined)                      # [B, n_leaves]
        logits = leaf_logits.gather(1, self.leaf_index(batch))
        return {name: logits[:, i] for i, name in enumerate(self.task_names)}


@register_model("ranking", "mfh", params=MFHParams)
def build_mfh(params, *, layout, loss=None, **_):
    return MFH(params, layout, loss)
