"""A kNN + neural hybrid: V-SKNN's votes fused with a neural sequence model's distribution.

    model: {name: knn-hybrid, neural: {name: hiersrec, ...}, knn: {k: 100, ...}}

At every level the neural model scores, the prediction is the mixture
    p(node) = (1 - w) · softmax(neural scores)(node) + w · votes(node) / Σ votes,
of the neural model's distribution and V-SKNN's votes normalised to a distribution (no popularity
fallback: an unvoted node gets no kNN mass; a history without any neighbour leaves the neural
ranking as it is). Scores are log p, so levels the neural model has no head for are derived by
the evaluator as usual (log-sum-exp of the leaf probabilities).

The weight w is chosen on the validation split carved from the training data, never on test: the
pipeline trains the neural part with the shared Trainer (its best epoch chosen with w = 0, the
neural model alone), then calls `tune_on_validation`, which scores the validation cases once with
both parts and picks, from `weights`, the w with the best `select_metric` at the leaf level (ties
to the smaller w). w is saved with the weights (a buffer), so a reloaded run predicts the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.evaluate.metrics import beats_target, metrics_from_ranks, ranks_from_beats
from hmtrec.models.registry import build_model, register_model, validate_model_params
from hmtrec.models.sequence.base import SequenceRecommender
from hmtrec.models.sequence.sknn import SessionKNN, VSKNNParams
from hmtrec.rundir import get_logger

# validation rows scored at once while choosing w: [rows, n_leaves] float32, a few kept per weight
_TUNE_CELLS = 2**24


class HybridParams(StrictModel):
    neural: dict[str, Any] = Field(default_factory=lambda: {"name": "hiersrec"},
                                   description="the neural model: {name, <its params>} (any trainable sequence model)")
    knn: VSKNNParams = Field(default_factory=VSKNNParams, description="the V-SKNN part")
    weights: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
                                 description="candidate kNN weights w, chosen on validation")
    select_metric: str = Field("MRR@20", description="leaf-level validation metric that picks w (METRIC@K)")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: list[float]) -> list[float]:
        if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
            raise ValueError(f"weights must be a non-empty list of values in [0, 1], got {weights}")
        return sorted(set(float(w) for w in weights))

    @field_validator("select_metric")
    @classmethod
    def _check_metric(cls, value: str) -> str:
        name, _, k = value.partition("@")
        if name not in ("Recall", "MRR", "NDCG") or not k.isdigit():
            raise ValueError(f"expected METRIC@K with METRIC Recall, MRR or NDCG, got {value!r}")
        return value


class KNNHybrid(SequenceRecommender):
    def __init__(self, taxonomy: Taxonomy, params: HybridParams, neural: SequenceRecommender):
        super().__init__(taxonomy)
        if not getattr(neural, "trainable", True):
            raise ConfigError(f"key 'model.neural': {params.neural.get('name')!r} is not a trainable model; the "
                              f"hybrid fuses V-SKNN with a neural one")
        self.params = params
        self.neural = neural
        self.knn = SessionKNN(taxonomy, params.knn.model_copy(update={"popularity_fallback": False}))
        self.register_buffer("knn_weight", torch.zeros(()))
        own_batches = getattr(neural, "training_batches", None)
        if callable(own_batches):       # e.g. GRU4Rec's session-parallel batches
            self.training_batches = own_batches

    @property
    def levels(self) -> list[str]:
        return list(self.neural.levels)

    def fit(self, train: SequenceData) -> None:
        """The kNN index; the neural part is trained by the Trainer through `loss`."""
        self.knn.fit(train)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.neural.loss(batch)

    def _parts(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per level the neural model scores: its probabilities and the kNN's normalised votes."""
        neural = {level: torch.softmax(scores.float(), dim=-1) for level, scores in self.neural.predict(batch).items()}
        votes = self.knn.predict(batch)
        knn = {}
        for level in neural:
            level_votes = votes[level].float().clamp_min(0)        # remind: false marks seen items -1
            knn[level] = level_votes / level_votes.sum(1, keepdim=True).clamp_min(1e-30)
        return neural, knn

    @staticmethod
    def _mix(neural: torch.Tensor, knn: torch.Tensor, weight: float) -> torch.Tensor:
        return ((1.0 - weight) * neural + weight * knn).clamp_min(1e-30).log()

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = float(self.knn_weight)
        if weight == 0.0:      # the neural model alone (while it trains): no kNN work
            return {level: torch.log_softmax(scores.float(), dim=-1) for level, scores in self.neural.predict(batch).items()}
        neural, knn = self._parts(batch)
        return {level: self._mix(neural[level], knn[level], weight) for level in neural}

    @torch.no_grad()
    def tune_on_validation(self, valid: SequenceData, *, max_len: int) -> dict:
        """Choose w on `valid` (carved from training): every candidate weight ranks the same
        validation cases; the best `select_metric` wins. Returns what was measured."""
        name, _, k = self.params.select_metric.partition("@")
        leaf = self.taxonomy.leaf_level
        windows = make_windows(valid, max_len)
        ranks: dict[float, list[torch.Tensor]] = {w: [] for w in self.params.weights}
        cumulative = np.r_[0, np.cumsum(valid.targets())]
        counts = cumulative[windows.start + windows.length] - cumulative[windows.start + 1]
        rows_per_batch = max(1, _TUNE_CELLS // max(self.taxonomy.n_leaves, 1))
        was_training = self.training
        self.eval()
        try:
            batch_windows, rows = [], 0
            for window in [*np.flatnonzero(counts > 0).tolist(), None]:
                if window is not None and (not batch_windows or rows + counts[window] <= rows_per_batch):
                    batch_windows.append(window)
                    rows += int(counts[window])
                    continue
                if batch_windows:
                    batch = collate_windows(valid, windows, np.asarray(batch_windows))
                    targets = batch["targets"][batch["targets"] != PAD]
                    neural, knn = self._parts(batch)
                    for weight in self.params.weights:
                        mixed = self._mix(neural[leaf], knn[leaf], weight)
                        ranks[weight].append(ranks_from_beats(beats_target(mixed, targets), targets))
                batch_windows, rows = ([window], int(counts[window])) if window is not None else ([], 0)
        finally:
            self.train(was_training)
        if not any(ranks.values()):
            raise ValueError("knn-hybrid: the validation split has no case to choose the kNN weight on")
        measured = {w: metrics_from_ranks(torch.cat(parts), [int(k)])[self.params.select_metric]
                    for w, parts in ranks.items()}
        best = max(measured, key=lambda w: (measured[w], -w))
        self.knn_weight.fill_(best)
        get_logger().info("knn-hybrid: validation %s by kNN weight %s -> w = %g", self.params.select_metric,
                          {f"{w:g}": round(v, 5) for w, v in measured.items()}, best)
        return {"knn_weight": best, "valid_by_weight": {f"{w:g}": v for w, v in measured.items()},
                "metric": f"{leaf}/{self.params.select_metric}"}

    def adopt_tuned(self, tuned: dict) -> None:
        """Take the weight another instance chose on validation (`tune_on_validation`'s result): a
        final fit, which has no validation split left, keeps its selection run's choice."""
        self.knn_weight.fill_(float(tuned["knn_weight"]))


@register_model("sequence", "knn-hybrid", params=HybridParams)
def build_knn_hybrid(params: HybridParams, *, taxonomy: Taxonomy, **context) -> KNNHybrid:
    if params.neural.get("name") == "knn-hybrid":
        raise ConfigError("key 'model.neural': a hybrid cannot nest another hybrid")
    try:
        entry, neural_params = validate_model_params("sequence", params.neural)
    except ConfigError as error:
        raise ConfigError(str(error).replace("'model.", "'model.neural.")) from None
    neural = build_model(entry, neural_params, taxonomy=taxonomy, **context)
    return KNNHybrid(taxonomy, params, neural)
