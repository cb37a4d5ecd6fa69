"""Multi-task losses: per-task losses with masks, and how tasks are weighted into one scalar.

Generic over models: a task is a name, a type ("binary" or "regression") and a weight. A row whose
label is missing has mask False for that task and contributes nothing to that task's loss.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TaskType = Literal["binary", "regression"]


def masked_task_losses(outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                       task_types: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per task over the rows where `mask` is True.

    outputs, labels, mask: [B, T] (outputs are logits for binary tasks, values for regression).
    Returns (losses[T], counts[T]); a task with no labelled row in the batch has loss 0 and no
    gradient, so a batch without labels for a task never produces NaN."""
    binary = torch.tensor([t == "binary" for t in task_types], device=outputs.device)
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    bce = F.binary_cross_entropy_with_logits(outputs, safe_labels.clamp(0, 1), reduction="none")
    squared = (outputs - safe_labels) ** 2
    row_losses = torch.where(binary, bce, squared) * mask
    counts = mask.sum(dim=0)
    return row_losses.sum(dim=0) / counts.clamp(min=1), counts


class LossWeighting(nn.Module):
    """Combines per-task losses[T] into one scalar."""

    def forward(self, task_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class FixedWeighting(LossWeighting):
    """sum_t w_t * L_t with fixed weights (from the task list)."""

    def __init__(self, weights: Sequence[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32), persistent=False)

    def forward(self, task_losses, present):
        return (self.weights.to(task_losses.device) * task_losses * present).sum()


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With a learned s_t = log sigma_t^2 per task: binary tasks add exp(-s_t) * L_t + s_t / 2,
    regression tasks add exp(-s_t) * L_t / 2 + s_t / 2. The fixed task weights still multiply
    each term, so a weight of 0 switches a task off. s_t starts at 0 (all weights 1)."""

    def __init__(self, task_types: Sequence[str], weights: Sequence[float] | None = None):
        super().__init__()
        self.log_variances = nn.Parameter(torch.zeros(len(task_types)))
        scale = [1.0 if t == "binary" else 0.5 for t in task_types]
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        weights = weights if weights is not None else [1.0] * len(task_types)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32), persistent=False)

    def forward(self, task_losses, present):
        s = self.log_variances
        terms = self.scale * torch.exp(-s) * task_losses + 0.5 * s
        return (self.weights * terms * present).sum()


def build_weighting(kind: str, task_types: Sequence[str], weights: Sequence[float]) -> LossWeighting:
    if kind == "fixed":
        return FixedWeighting(weights)
    if kind == "uncertainty":
        return UncertaintyWeighting(task_types, weights)
    raise ValueError(f"unknown loss weighting {kind!r}; known: fixed, uncertainty")
