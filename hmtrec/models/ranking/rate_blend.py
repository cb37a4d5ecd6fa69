"""Fitting `model.rate_blend` after training: the trained network's logit mixed with a rate
baseline's logit, (1 - w) * network + w * rate, everything chosen on the validation rows.

1. Each candidate rate (every kind of `kinds` with every smoothing of `smoothings`) is fitted on the
   training rows and scored alone on validation; the best one (by the run's monitored metric,
   averaged over (scenario, task) pairs as early stopping does) is kept.
2. Per binary task, w is the value of `weights` whose mix scores best on validation for that task
   (averaged over its scenarios); ties go to the smaller w, so w = 0 (the network alone) wins
   unless the mix is strictly better.

Why: a rate counted on the training rows is a different model of the same rows (no embeddings, no
experts): on MovieLens-1M's cold-user preset it scores about as well as the networks on test,
and the two err differently. The test rows are never read here.
"""

from __future__ import annotations

import numpy as np
import torch

from hmtrec.data.features import EncodedRows
from hmtrec.evaluate.classification import binary_metrics_by_group


def _logits(model, rows: EncodedRows, batch_size: int) -> np.ndarray:
    """[N, n_tasks] network outputs (logits for binary tasks), the blend left out."""
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for batch in rows.batches(batch_size):
            outputs = model(batch)
            parts.append(torch.stack([outputs[name] for name in model.task_names], dim=1).float())
    model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(model.task_names)), dtype=np.float32)


def _rate_logits(prior, rows: EncodedRows, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        parts = [prior(batch) for batch in rows.batches(batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)


class _Scorer:
    """The validation metric of one task's scores: mean over scenarios of AUC (higher is better) or
    of logloss (returned negated, so higher is better either way)."""

    def __init__(self, rows: EncodedRows, monitor: str):
        self.labels = rows.labels.numpy().astype(np.float64)
        self.labels[~rows.label_mask.numpy()] = np.nan
        self.groups = rows.scenario.numpy() if rows.scenario is not None else None
        self.monitor = monitor

    def __call__(self, logits: np.ndarray, task: int) -> float:
        probabilities = 1 / (1 + np.exp(-np.clip(logits, -40, 40)))
        table = binary_metrics_by_group(probabilities, self.labels[:, task], self.groups)
        values = table[self.monitor].dropna()
        if values.empty:
            return float("nan")
        return float(values.mean()) if self.monitor == "auc" else -float(values.mean())


def fit_rate_blend(model, train: EncodedRows, valid: EncodedRows, settings, *, monitor: str = "auc",
                   batch_size: int = 32768) -> dict:
    """Choose the rate and the weights on `valid` and set them in `model.rate_blend`; what was tried
    and chosen, for metrics.json. `settings`: the run's `RateBlendSettings`."""
    blend = model.rate_blend
    blend.choice.fill_(-1)
    blend.weights.zero_()
    if len(valid) == 0:
        return {"skipped": "no validation rows: the network alone serves"}
    if not blend.binary:
        return {"skipped": "no binary task: the network alone serves (rates blend only binary tasks)"}
    score = _Scorer(valid, monitor)
    binary = blend.binary
    network = _logits(model, valid, batch_size)
    candidates = []
    best = None
    for index, kind in enumerate(blend.kinds):
        prior = blend.priors[kind]
        for smoothing in settings.smoothings:
            prior.smoothing = smoothing
            prior.fit(train)
            rate = _rate_logits(prior, valid, batch_size)
            value = float(np.mean([score(rate[:, i], i) for i in binary]))
            candidates.append({"kind": kind, "smoothing": smoothing, "valid": value})
            if best is None or value > best[0]:
                tables = {name: table.clone() for name, table in prior.named_buffers()}
                best = (value, index, smoothing, rate, tables)
    value, index, smoothing, rate, tables = best
    prior = blend.priors[blend.kinds[index]]
    prior.smoothing = smoothing
    for name, table in prior.named_buffers():   # its tables hold the last smoothing tried
        table.copy_(tables[name])
    weights, per_task = {}, {}
    for i in binary:
        name = model.task_names[i]
        tried = [(score((1 - w) * network[:, i] + w * rate[:, i], i), w) for w in settings.weights]
        chosen_value, chosen_w = max(tried, key=lambda pair: (pair[0], -pair[1]))   # ties: the smaller w
        weights[name] = chosen_w
        per_task[name] = {"network": score(network[:, i], i), "rate": score(rate[:, i], i), "blend": chosen_value}
        blend.weights[i] = chosen_w
    blend.choice.fill_(index)
    average = {part: float(np.mean([task[part] for task in per_task.values()])) for part in ("network", "rate", "blend")}
    sign = 1 if monitor == "auc" else -1
    return {"kind": blend.kinds[index], "smoothing": smoothing, "weights": weights, "monitor": monitor,
            "valid": {part: sign * v for part, v in average.items()},
            "valid_by_task": {name: {part: sign * v for part, v in values.items()} for name, values in per_task.items()},
            "candidates": [{**c, "valid": sign * c["valid"]} for c in candidates]}
