"""The action-token transformer's post-training stage, fitted on held-out (validation) examples.

Two steps, each a switch of the model (`ActionTransformerParams`), both chosen per bucket of the
example's recent activity (`blend_count_edges`) on validation, never on test:

- `reference_blend`: p = (1 - w) · p_model + w · p_geo-history-pop per head level, w from 0, 0.05,
  ..., 1; each coarser head level's w by that level's MRR;
- `region_conditioning`: the finest level q(c) ∝ p(c) · p(parent(c))^α, p the (blended)
  distributions served, α from `conditioning_alphas`; the finest level's blend weight and α are
  chosen together, by the finest level's MRR. For a model without a head at the parent level
  (single-level) p(parent) is the sum of its cells. With `tied_regions` the coarser levels served
  are the marginals of q, so the region and the cells served agree.

`fit_post_training` sets the model's buffers and returns what the stage did on validation: each
variant (the model alone, the blend, the conditioning, both) with its settings fitted on all of
validation (in-sample) and cross-fitted (each half of the users scored with the settings chosen on
the other half: an out-of-sample estimate), with the hierarchy-violation rate of each.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch

from hmtrec.evaluate.metrics import target_ranks

BLEND_GRID = torch.linspace(0, 1, 21)      # reference weights 0, 0.05, ..., 1
CHUNK = 4096                               # examples scored at once


def serve_rows(model, inputs: dict, rows: torch.Tensor, weights: torch.Tensor | None, alpha: torch.Tensor | None,
               tie: bool | None = None) -> dict[str, torch.Tensor]:
    """The served log-probabilities of `rows` of `inputs` (`post_training_inputs`) under blend
    weights [n_heads, n_buckets] and α [n_buckets] (each None: that step off)."""
    bucket = inputs["buckets"][rows]
    reference = None if weights is None else {level: p[rows] for level, p in inputs["reference"].items()}
    return model.served({level: p[rows] for level, p in inputs["model"].items()}, reference,
                        None if weights is None else weights[:, bucket].T,
                        None if alpha is None else alpha[bucket], tie=tie)


def _chunks(rows: torch.Tensor) -> Iterable[torch.Tensor]:
    return (rows[start:start + CHUNK] for start in range(0, len(rows), CHUNK))


def _best_per_bucket(reciprocal: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """reciprocal [n_buckets, candidates] sums of 1 / rank -> each bucket's best candidate (0 when empty)."""
    return torch.where(present, reciprocal.argmax(-1), 0)


def fit_settings(model, inputs: dict, rows: torch.Tensor, *, blend: bool, conditioning: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(blend weights [n_heads, n_buckets] or None, α [n_buckets] or None) with the best MRR on `rows`."""
    return fit_variants(model, inputs, rows, [(blend, conditioning)])[(blend, conditioning)]


def fit_variants(model, inputs: dict, rows: torch.Tensor, variants: list[tuple[bool, bool]]) -> dict:
    """{(blend, conditioning): settings as `fit_settings` returns them} for several variants, the
    blend alone read off the grid of the blend with the conditioning (its α = 0 column)."""
    head_levels, n_buckets = model.head_levels, model.n_blend_buckets
    present = torch.bincount(inputs["buckets"][rows], minlength=n_buckets) > 0
    # the coarser head levels: their own blend weight by their own MRR (the finest does not change them)
    coarse = torch.zeros(len(head_levels), n_buckets)
    for head, level in enumerate(head_levels[:-1] if any(blend for blend, _ in variants) else []):
        reciprocal = torch.zeros(n_buckets, len(BLEND_GRID), dtype=torch.float64)
        for chunk in _chunks(rows):
            model_p, reference_p = inputs["model"][level][chunk], inputs["reference"][level][chunk]
            for index, w in enumerate(BLEND_GRID.tolist()):
                ranks = target_ranks((1 - w) * model_p + w * reference_p, inputs["targets"][level][chunk])
                reciprocal[:, index].index_add_(0, inputs["buckets"][chunk], 1.0 / ranks)
        coarse[head] = BLEND_GRID[_best_per_bucket(reciprocal, present)]
    out = {}
    for blend, conditioning in sorted(set(variants), key=lambda v: (not v[0], not v[1])):   # both first
        if (blend, conditioning) in out:
            continue
        grid = BLEND_GRID if blend else torch.zeros(1)
        alphas = model.params.conditioning_alphas if conditioning else [0.0]
        reciprocal = finest_grid(model, inputs, rows, coarse if blend else None, grid, alphas)
        for alpha_only_zero in ((False, True) if blend and conditioning else (not conditioning,)):
            columns = [index for index in range(len(grid) * len(alphas))
                       if not alpha_only_zero or alphas[index % len(alphas)] == 0]
            if alpha_only_zero and conditioning and not columns:
                continue
            best = torch.tensor(columns)[_best_per_bucket(reciprocal[:, columns], present)]
            weights = None
            if blend:
                weights = coarse.clone()
                weights[-1] = grid[best // len(alphas)]
            alpha = None if alpha_only_zero else torch.tensor(alphas)[best % len(alphas)]
            out[(blend, not alpha_only_zero)] = (weights, alpha)
    return {variant: out[variant] for variant in variants}


def finest_grid(model, inputs: dict, rows: torch.Tensor, coarse: torch.Tensor | None, grid: torch.Tensor,
                alphas: list[float]) -> torch.Tensor:
    """[n_buckets, len(grid) * len(alphas)] sums of 1 / rank of the finest level's target on `rows`
    for every (finest blend weight, α) pair (weight-major), the coarser heads blended with `coarse`
    (None: no blend). log q = log p(c) + α log p(parent(c)) up to each row's normaliser, which no
    rank depends on: the blend is served once per weight."""
    n_buckets = model.n_blend_buckets
    finest = model.output_levels[-1]
    conditioning = any(a != 0 for a in alphas)
    parent_level = model.output_levels[-2] if conditioning else None
    parent = getattr(model, f"finest_ancestor_{parent_level}") if conditioning else None
    reciprocal = torch.zeros(n_buckets, len(grid) * len(alphas), dtype=torch.float64)
    for chunk in _chunks(rows):
        chunk_buckets, targets = inputs["buckets"][chunk], inputs["targets"][finest][chunk]
        for w_index, w in enumerate(grid.tolist()):
            weights = None
            if coarse is not None:
                weights = coarse.clone()
                weights[-1] = w
            served = serve_rows(model, inputs, chunk, weights, None)
            parent_scores = served[parent_level][:, parent] if conditioning else None
            for a_index, a in enumerate(alphas):
                scores = served[finest] if a == 0 else served[finest] + a * parent_scores
                reciprocal[:, w_index * len(alphas) + a_index].index_add_(
                    0, chunk_buckets, 1.0 / target_ranks(scores, targets))
    return reciprocal


def score_rows(model, inputs: dict, rows: torch.Tensor, weights, alpha, tie: bool | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{output level: (target ranks, top nodes)} of `rows` as served under the settings."""
    ranks = {level: [] for level in model.output_levels}
    tops = {level: [] for level in model.output_levels}
    for chunk in _chunks(rows):
        served = serve_rows(model, inputs, chunk, weights, alpha, tie=tie)
        for level in model.output_levels:
            ranks[level].append(target_ranks(served[level], inputs["targets"][level][chunk]))
            tops[level].append(served[level].argmax(1))
    return {level: (torch.cat(ranks[level]).numpy(), torch.cat(tops[level]).numpy()) for level in model.output_levels}


def fit_post_training(model, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]], users: np.ndarray,
                      kinds: np.ndarray, ks: list[int]) -> dict | None:
    """Fit the model's post-training steps on held-out examples (`batches` of (batch, target
    leaves), in the order of `users` and `kinds`, one entry per example) and set its buffers.
    Returns the record metrics.json keeps (None when the model has no post-training step)."""
    from hmtrec.data.actions import KIND_NAMES
    from hmtrec.evaluate.geo import rank_metrics, violation_rates

    params = model.params
    if not (params.reference_blend or params.region_conditioning):
        return None
    started = time.perf_counter()
    inputs = model.post_training_inputs(batches)
    n = len(inputs["buckets"])
    everything = torch.arange(n)
    folds = torch.from_numpy(np.asarray(users) % 2)
    views = {"overall": np.arange(n), **{name: np.flatnonzero(np.asarray(kinds) == code)
                                         for code, name in enumerate(KIND_NAMES)}}

    def summary(scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict, dict]:
        metrics = {view: {level: rank_metrics(scored[level][0][rows], ks) for level in model.output_levels}
                   for view, rows in views.items()}
        tops = {level: top for level, (_, top) in scored.items()}
        pair = next(iter(violation_rates(model.taxonomy, tops)))
        return metrics, {view: violation_rates(model.taxonomy, tops, rows)[pair] for view, rows in views.items()}

    variants = {"model alone": (False, False)}
    if params.reference_blend:
        variants["blend"] = (True, False)
    if params.region_conditioning:
        variants["conditioning"] = (False, True)
    if params.reference_blend and params.region_conditioning:
        variants["blend + conditioning"] = (True, True)
    record: dict = {"variants": {}}
    wanted = list(variants.values())
    all_fitted = fit_variants(model, inputs, everything, wanted)
    all_cross = [fit_variants(model, inputs, torch.nonzero(folds != fold).squeeze(1), wanted) for fold in (0, 1)]
    for name, (blend, conditioning) in variants.items():
        fitted = all_fitted[(blend, conditioning)]
        cross = [settings[(blend, conditioning)] for settings in all_cross]
        # a model with a head at the parent level: also its other way of serving the coarser levels
        ties = (None, not params.tied_regions) if conditioning and model.output_levels[-2] in model.head_levels \
            else (None,)
        for tie in ties:
            label = name if tie is None else f"{name}, {'tied' if tie else 'head'} regions"
            in_sample = summary(score_rows(model, inputs, everything, *fitted, tie=tie))
            pieces = [(torch.nonzero(folds == fold).squeeze(1).numpy(),
                       score_rows(model, inputs, torch.nonzero(folds == fold).squeeze(1), *cross[fold], tie=tie))
                      for fold in (0, 1)]
            stitched = {}
            for level in model.output_levels:
                ranks, tops = np.empty(n), np.empty(n, dtype=np.int64)
                for rows, scored in pieces:
                    ranks[rows], tops[rows] = scored[level]
                stitched[level] = (ranks, tops)
            out_of_sample = summary(stitched)
            record["variants"][label] = {"fitted": in_sample[0], "violation_fitted": in_sample[1],
                                         "cross_fitted": out_of_sample[0], "violation_cross_fitted": out_of_sample[1],
                                         **({"weights": {level: [round(w, 4) for w in fitted[0][head].tolist()]
                                                         for head, level in enumerate(model.head_levels)}}
                                            if fitted[0] is not None else {}),
                                         **({"alpha": [round(a, 4) for a in fitted[1].tolist()]}
                                            if fitted[1] is not None else {})}
    served_name = list(variants)[-1]                     # every step the model has on
    weights, alpha = fitted                              # the last variant's, fitted on all of validation
    if weights is not None:
        model.blend_weights.copy_(weights)
    if alpha is not None:
        model.conditioning_alpha.copy_(alpha)
    served = record["variants"][served_name]
    record.update({"served": served_name,
                   "examples": torch.bincount(inputs["buckets"], minlength=model.n_blend_buckets).tolist(),
                   **{key: served[key] for key in ("weights", "alpha") if key in served},
                   "valid_alone": record["variants"]["model alone"]["fitted"],
                   "valid_fitted": served["fitted"], "valid_cross_fitted": served["cross_fitted"],
                   "seconds": time.perf_counter() - started})
    return record


POST_TRAINING_BUFFERS = ("blend_weights", "conditioning_alpha")   # what `fit_post_training` sets


def adopt_post_training(model, fitted) -> None:
    """Give `model` the post-training settings fitted on another instance (a final fit takes its
    selection run's: the final model has trained on the validation examples the stage is fitted on)."""
    for name in POST_TRAINING_BUFFERS:
        if hasattr(fitted, name):
            getattr(model, name).copy_(getattr(fitted, name))
