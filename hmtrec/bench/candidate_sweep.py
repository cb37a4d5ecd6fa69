"""Candidate-size sweep: for every k from 1 to all nodes of a coarse level, the share of the
catalogue the top-k nodes cover and the leaf-level Recall@K, MRR@K and coverage when only their
leaves are ranked.

All k at once from one scoring pass: for each case, count the leaves that beat the target (the
evaluator's rule: a higher score, or an equal score at a lower index) under each node, order the
nodes by the model's score for that level (ties to the lower index, as `top_nodes` does), and take
cumulative sums. The target's rank among the leaves of the top k nodes is then 1 + the cumulative
count at k, if the target's own node is among the k; otherwise the case is a miss. This equals
running the evaluator in fixed-k candidate mode once per k, at the cost of one run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hmtrec.data.sequences import PAD, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.progress import track
from hmtrec.serve.candidates import aggregate_leaf_scores


@dataclass
class SweepResult:
    level: str
    ks: np.ndarray              # 1 .. n_nodes
    fraction: np.ndarray        # mean share of leaves among the candidates, per k
    coverage: np.ndarray        # share of targets whose leaf is among the candidates, per k
    recall: np.ndarray          # leaf Recall@cutoff among the candidates, per k
    mrr: np.ndarray             # leaf MRR@cutoff among the candidates, per k
    cutoff: int
    n_cases: int

    def rows(self, ks: list[int] | None = None) -> list[dict]:
        ks = ks or default_ks(len(self.ks))
        return [{"k": int(k), "candidate fraction": f"{self.fraction[k - 1] * 100:.2f}%",
                 "coverage": f"{self.coverage[k - 1] * 100:.2f}",
                 f"Recall@{self.cutoff}": f"{self.recall[k - 1] * 100:.2f}",
                 f"MRR@{self.cutoff}": f"{self.mrr[k - 1] * 100:.2f}"} for k in ks]


def default_ks(n_nodes: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including all nodes."""
    ks, scale = [], 1
    while scale < n_nodes:
        ks += [k for k in (scale, 2 * scale, 5 * scale) if k < n_nodes]
        scale *= 10
    return ks + [n_nodes]


def _beats(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """bool [M, N]: leaf outranks the target (higher score, or equal score at a lower index)."""
    target_scores = scores.gather(1, targets[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    return (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))


@torch.no_grad()
def candidate_sweep(model, data: SequenceData, taxonomy: Taxonomy, level: str, *, max_len: int,
                    cutoff: int = 20, score_budget_mb: float = 256.0, aggregation: str = "logsumexp"
                    ) -> SweepResult:
    """Sweep k over every node of `level` (see the module docstring). The model's own scores for
    `level` choose the nodes; a model without that level gets them from its leaf scores
    (`aggregation`, as the evaluator does)."""
    level_index = taxonomy.level_index(level)
    if level_index >= taxonomy.n_levels - 1:
        raise ValueError(f"candidate level {level!r} must be coarser than the leaves")
    n_nodes, n_leaves = taxonomy.n_nodes(level), taxonomy.n_leaves
    leaf_node = torch.from_numpy(taxonomy.ancestor_table(level))
    leaf_counts = torch.from_numpy(taxonomy.leaf_counts(level)).double()
    windows = make_windows(data, max_len)
    # per case and leaf: the float32 score, a bool and a float32 count, plus temporaries
    max_rows = max(1, int(score_budget_mb * 2**20 // (n_leaves * 16)))
    cumulative = np.r_[0, np.cumsum(data.targets())]
    counts = cumulative[windows.start + windows.length] - cumulative[windows.start + 1]
    batches, current, rows = [], [], 0
    for window in np.flatnonzero(counts > 0).tolist():
        if current and rows + counts[window] > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(window)
        rows += int(counts[window])
    if current:
        batches.append(current)

    hits = torch.zeros(n_nodes, dtype=torch.float64)
    reciprocal = torch.zeros(n_nodes, dtype=torch.float64)
    covered = torch.zeros(n_nodes, dtype=torch.float64)
    fraction = torch.zeros(n_nodes, dtype=torch.float64)
    n_cases = 0
    model.eval()
    for rows_of_batch in track(batches, f"candidate sweep ({level})"):
        batch = collate_windows(data, windows, np.asarray(rows_of_batch))
        targets = batch["targets"][batch["targets"] != PAD]
        predictions = model.predict(batch)
        leaf_scores = predictions[taxonomy.leaf_level].float()
        node_scores = predictions.get(level)
        if node_scores is None:
            node_scores = aggregate_leaf_scores(leaf_scores, taxonomy, level, aggregation)
        beats = _beats(leaf_scores, targets)
        # float32 counts are exact up to 2^24 leaves per node
        beats_per_node = torch.zeros(len(targets), n_nodes, dtype=torch.float32)
        beats_per_node.scatter_add_(1, leaf_node.expand(len(targets), -1), beats.float())
        order = torch.sort(node_scores.float(), dim=1, descending=True, stable=True).indices
        rank_at_k = 1.0 + torch.cumsum(beats_per_node.gather(1, order).double(), dim=1)  # [M, n_nodes]
        target_node = leaf_node[targets]
        target_position = (order == target_node[:, None]).float().argmax(1)             # 0-based
        inside = torch.arange(n_nodes)[None, :] >= target_position[:, None]            # k - 1 >= position
        hit = inside & (rank_at_k <= cutoff)
        hits += hit.sum(0)
        reciprocal += torch.where(hit, 1.0 / rank_at_k, torch.zeros_like(rank_at_k)).sum(0)
        covered += inside.sum(0)
        fraction += torch.cumsum(leaf_counts[order], dim=1).sum(0) / n_leaves
        n_cases += len(targets)
    n = max(n_cases, 1)
    return SweepResult(level=level, ks=np.arange(1, n_nodes + 1), fraction=(fraction / n).numpy(),
                       coverage=(covered / n).numpy(), recall=(hits / n).numpy(), mrr=(reciprocal / n).numpy(),
                       cutoff=cutoff, n_cases=n_cases)


def plot_sweeps(sweeps: dict[str, SweepResult], path, *, title: str = "") -> None:
    """Recall, MRR and coverage against the candidate fraction, one line style per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for index, (label, sweep) in enumerate(sweeps.items()):
        colour = f"C{index % 10}"
        x = sweep.fraction * 100
        for axis, values, name in zip(axes, (sweep.recall, sweep.mrr, sweep.coverage),
                                      (f"Recall@{sweep.cutoff}", f"MRR@{sweep.cutoff}", "coverage")):
            axis.plot(x, values * 100, color=colour, label=label)
            axis.set_xscale("log")
            axis.set_xlabel(f"candidates: % of leaves (top-k {sweep.level} nodes)")
            axis.set_ylabel(f"{name} (×100)")
            axis.grid(alpha=0.3, which="both")
    # below the panels: long labels (run directories) would cover the curves
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
