"""The item losses every neural sequence model trains with (HierSRec's heads, SASRec, GRU4Rec), so
that timings compare architectures, not loss implementations.

- `softmax_cross_entropy`: the exact full-softmax cross-entropy over the whole catalogue, in few
  passes over the [M, N] logits, with optional label smoothing;
- `sampled_softmax_cross_entropy`: a softmax over the batch's own target items (in-batch negatives)
  plus optional uniformly drawn items, with the log-Q correction, so an epoch costs [M, C] instead of
  [M, N] work when the catalogue N is large;
- `item_loss`: one of the two from a model's `ItemLossParams` (the one switch a model exposes).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.autograd.function import once_differentiable

from hmtrec.config import StrictModel


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows, in few passes over the [M, N] logits: the leaf
    level's N can be 10^4-10^6, and then these passes, not the matmul, bound a training step.
    Works in the logits' dtype (float32, or bfloat16 under autocast) with float32 sums.
    With smoothing s the target distribution is (1 - s) one-hot + s / N uniform."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0,
                consume: bool = False) -> torch.Tensor:
        row_max = logits.amax(dim=1, keepdim=True)
        mean_logits = logits.mean(dim=1, dtype=torch.float32) if smoothing else None
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        # consume: the caller's logits are a temporary nobody reads again, so the exponentials
        # overwrite them (one [M, N] allocation and pass less per step)
        shifted_exp = (logits.sub_(row_max) if consume else torch.sub(logits, row_max)).exp_()
        sums = shifted_exp.sum(dim=1, dtype=torch.float32)
        log_sum_exp = row_max.squeeze(1).float() + sums.log()
        ctx.save_for_backward(shifted_exp, sums, targets)
        ctx.smoothing = smoothing
        if smoothing:
            # -Σ_c q_c log p_c with q = (1 - s) one-hot + s / N
            return ((1 - smoothing) * (log_sum_exp - target_logits) + smoothing * (log_sum_exp - mean_logits)).mean()
        return (log_sum_exp - target_logits).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        shifted_exp, sums, targets = ctx.saved_tensors
        n_rows, n_classes = shifted_exp.shape
        scale = grad_output.float() / n_rows
        # d loss / d logits = (softmax - q) / M, written over the saved exponentials.
        gradient = shifted_exp.mul_((scale / sums)[:, None].to(shifted_exp.dtype))
        rows = torch.arange(n_rows, device=gradient.device)
        smoothing = ctx.smoothing
        if smoothing:
            gradient.sub_((scale * smoothing / n_classes).to(gradient.dtype))
        gradient[rows, targets] -= (scale * (1 - smoothing)).to(gradient.dtype)
        return gradient, None, None, None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, *,
                          consume_logits: bool = False) -> torch.Tensor:
    """Mean cross-entropy of logits [M, N] against class indices [M] (equal to
    F.cross_entropy(logits, targets, label_smoothing=label_smoothing)). `consume_logits`: the
    logits are overwritten (only for a temporary that neither the caller nor autograd reads again,
    such as the output of the matmul that made it)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _SoftmaxCrossEntropy.apply(logits, targets, float(label_smoothing), consume_logits)


def sample_item_candidates(targets: torch.Tensor, n_items: int, uniform_negatives: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled softmax's shared candidate set for targets [M] over a catalogue of n_items:
    the batch's distinct target items (in-batch negatives) plus `uniform_negatives` items drawn
    uniformly with replacement (torch's global generator, which the Trainer seeds per epoch, so runs
    resume identically). -> (candidates [C], each row's target column [M], the log-Q correction [C]).

    Log-Q correction (Bengio & Senécal 2008; Yi et al., RecSys 2019): each candidate's logit is
    lowered by the log of how often it is expected among the candidates, M·p̂(j) + K/N, with p̂(j) the
    item's share of this batch's targets, so popular items, which are negatives far more often than
    a full softmax would make them, are not pushed down too hard."""
    candidates, target_column, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    expected = counts.to(torch.float32)
    if uniform_negatives > 0:
        drawn = torch.randint(n_items, (uniform_negatives,), device=targets.device)
        extra = drawn[~torch.isin(drawn, candidates)].unique()
        candidates = torch.cat([candidates, extra])
        expected = torch.cat([expected, expected.new_zeros(len(extra))]) + uniform_negatives / n_items
    return candidates, target_column, expected.log()


def sampled_softmax_cross_entropy(hidden: torch.Tensor, item_weight: torch.Tensor, item_bias: torch.Tensor | None,
                                  targets: torch.Tensor, *, uniform_negatives: int = 0,
                                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each row's target against a shared candidate set (`sample_item_candidates`:
    in-batch targets plus uniform negatives, log-Q corrected). Equal to the full softmax when every
    item is a candidate and the correction is the same for all.
    hidden [M, D], item_weight [N, D], item_bias [N] or None, targets [M] -> scalar."""
    candidates, target_column, log_q = sample_item_candidates(targets, item_weight.shape[0], uniform_negatives)
    logits = hidden @ item_weight[candidates].T
    if item_bias is not None:
        logits = logits + item_bias[candidates]
    logits = logits - log_q.to(logits.dtype)
    return softmax_cross_entropy(logits, target_column, label_smoothing, consume_logits=True)


class SampledLossParams(StrictModel):
    """The item-loss switch of a model's parameters (HierSRec; SASRec and GRU4Rec through ItemLossParams)."""

    item_loss: Literal["full", "sampled"] = Field(
        "full", description="full: exact softmax over every item; sampled: softmax over the batch's target "
                            "items plus `uniform_negatives`, with log-Q correction (cheaper for large catalogues)")
    uniform_negatives: int = Field(0, ge=0, description="sampled loss: items drawn uniformly per batch beside "
                                                         "the in-batch negatives")


class ItemLossParams(SampledLossParams):
    """The item-loss switches a model's parameters inherit (SASRec, GRU4Rec)."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="share of the target mass spread "
                                                                     "uniformly over the classes")


def item_loss(hidden: torch.Tensor, item_weight: torch.Tensor, item_bias: torch.Tensor | None,
              targets: torch.Tensor, params: ItemLossParams) -> torch.Tensor:
    """The training loss of item scores `hidden @ item_weight.T (+ item_bias)` against `targets`."""
    if params.item_loss == "sampled":
        return sampled_softmax_cross_entropy(hidden, item_weight, item_bias, targets,
                                             uniform_negatives=params.uniform_negatives,
                                             label_smoothing=params.label_smoothing)
    logits = hidden @ item_weight.T
    if item_bias is not None:
        logits = logits + item_bias
    # the logits are a temporary: the matmul's (and the bias add's) backward does not read them
    return softmax_cross_entropy(logits, targets, params.label_smoothing, consume_logits=True)


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


# rows of the [rows, C] logit blocks of `linear_cross_entropy_rows`: about 512K floats (2 MB), which
# stay in cache between the matmul that writes them and the passes that read them
_LINEAR_CE_BLOCK = 1 << 19


def _logit_blocks(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(rows, query[rows] @ weight.T + bias) block by block, each block's logits written into one
    reused buffer (the next block overwrites it)."""
    n_rows, n_classes = query.shape[0], weight.shape[0]
    block = max(1, _LINEAR_CE_BLOCK // max(n_classes, 1))
    buffer = query.new_empty(min(block, n_rows), n_classes)
    weight_t = weight.T
    for first in range(0, n_rows, block):
        rows = slice(first, min(first + block, n_rows))
        yield rows, torch.addmm(bias, query[rows], weight_t, out=buffer[:rows.stop - first])


class _LinearRowCrossEntropy(torch.autograd.Function):
    """`softmax_cross_entropy_rows(query @ weight.T + bias, targets)` without the [M, C] logits in
    memory: forward and backward walk blocks of rows, and backward recomputes each block's logits
    (one matmul) rather than reading saved probabilities. On a sampled softmax (C in the thousands)
    the full [M, C] passes, each through freshly allocated memory, cost more than the matmuls.
    float32 throughout (under bf16 autocast too: at these widths bf16 only adds casts)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor
                ) -> torch.Tensor:
        dtypes = (query.dtype, weight.dtype, bias.dtype)
        query, weight, bias = query.float(), weight.float(), bias.float()
        log_sum_exp = query.new_empty(query.shape[0])
        for rows, logits in _logit_blocks(query, weight, bias):
            row_max = logits.amax(dim=1, keepdim=True)
            sums = logits.sub_(row_max).exp_().sum(dim=1)
            log_sum_exp[rows] = row_max.squeeze(1) + sums.log()
        target_logits = (query * weight[targets]).sum(dim=1) + bias[targets]
        ctx.save_for_backward(query, weight, bias, targets, log_sum_exp)
        ctx.dtypes = dtypes
        return log_sum_exp - target_logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        query, weight, bias, targets, log_sum_exp = ctx.saved_tensors
        grad_output = grad_output.float()
        grad_query = torch.empty_like(query)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias)
        for rows, gradient in _logit_blocks(query, weight, bias):
            # d loss_i / d logits_i = g_i (softmax_i - onehot(target_i))
            gradient.sub_(log_sum_exp[rows, None]).exp_().mul_(grad_output[rows, None])
            gradient[torch.arange(rows.stop - rows.start), targets[rows]] -= grad_output[rows]
            torch.mm(gradient, weight, out=grad_query[rows])
            grad_weight.addmm_(gradient.T, query[rows])
            grad_bias.add_(gradient.sum(dim=0))
        query_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return grad_query.to(query_dtype), grad_weight.to(weight_dtype), grad_bias.to(bias_dtype), None


def linear_cross_entropy_rows(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row [M] (float32) of the logits `query [M, D] @ weight [C, D].T + bias [C]`
    against class indices [M], equal to `softmax_cross_entropy_rows(torch.addmm(bias, query, weight.T),
    targets)` up to float rounding, computed in blocks of rows (`_LinearRowCrossEntropy`)."""
    with torch.autocast(query.device.type, enabled=False):
        return _LinearRowCrossEntropy.apply(query, weight, bias, targets)
