"""The full-softmax cross-entropy every neural sequence model trains with (HierSRec's heads, SASRec,
GRU4Rec), so that timings compare architectures, not loss implementations."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows, in few passes over the [M, N] logits: the leaf
    level's N can be 10^4-10^6, and then these passes, not the matmul, bound a training step.
    Works in the logits' dtype (float32, or bfloat16 under autocast) with float32 sums."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        row_max = logits.amax(dim=1, keepdim=True)
        shifted_exp = torch.sub(logits, row_max).exp_()
        sums = shifted_exp.sum(dim=1, dtype=torch.float32)
        log_sum_exp = row_max.squeeze(1).float() + sums.log()
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(shifted_exp, sums, targets)
        return (log_sum_exp - target_logits).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        shifted_exp, sums, targets = ctx.saved_tensors
        n_rows = shifted_exp.shape[0]
        scale = grad_output.float() / n_rows
        # d loss / d logits = (softmax - one_hot) / M, written over the saved exponentials.
        gradient = shifted_exp.mul_((scale / sums)[:, None].to(shifted_exp.dtype))
        rows = torch.arange(n_rows, device=gradient.device)
        gradient[rows, targets] -= scale.to(gradient.dtype)
        return gradient, None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [M, N] against class indices [M] (equal to F.cross_entropy)."""
    return _SoftmaxCrossEntropy.apply(logits, targets)


class _RowSoftmaxCrossEntropy(torch.autograd.Function):
    """`_SoftmaxCrossEntropy` without the mean: one cross-entropy per row, for losses that combine
    a row's catalogue softmax with other terms (a copy mechanism's mixture, soft targets)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        row_max = logits.amax(dim=1, keepdim=True)
        shifted_exp = torch.sub(logits, row_max).exp_()
        sums = shifted_exp.sum(dim=1, dtype=torch.float32)
        log_sum_exp = row_max.squeeze(1).float() + sums.log()
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(shifted_exp, sums, targets)
        return log_sum_exp - target_logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        shifted_exp, sums, targets = ctx.saved_tensors
        scale = grad_output.float()
        gradient = shifted_exp.mul_((scale / sums)[:, None].to(shifted_exp.dtype))
        rows = torch.arange(shifted_exp.shape[0], device=gradient.device)
        gradient[rows, targets] -= scale.to(gradient.dtype)
        return gradient, None


def softmax_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of logits [M, N] against class indices [M], float32 [M]
    (equal to F.cross_entropy(..., reduction="none"))."""
    return _RowSoftmaxCrossEntropy.apply(logits, targets)
