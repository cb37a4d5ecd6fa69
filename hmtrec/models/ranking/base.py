"""The ranking-model contract, shared by Shared-Bottom, MMoE, PLE, HiNet and MFH.

A ranking model maps a batch of encoded rows (see `hmtrec.data.features.EncodedRows.batch`) to one
output per task: `forward(batch) -> {task: [B]}` (logits for binary tasks, values for regression).
`loss(batch)` masks rows without a label for a task and combines the task losses with the
configured weighting; `predict(batch)` returns probabilities (binary) or values (regression).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from pydantic import Field, field_validator

from hmtrec.config import StrictModel
from hmtrec.data.features import FeatureLayout
from hmtrec.models.families import MULTI_TASK_ROWS
from hmtrec.models.ranking.blocks import FeatureEmbedding, LinearTerms, RateBlend, RatePrior
from hmtrec.train.losses import build_weighting, masked_task_losses


class RatePriorSettings(StrictModel):
    """`model.rate_prior`: a smoothed training rate's logit added to each binary task's logit as a
    fixed offset (hmtrec/models/ranking/rates.py computes it; docs/ranking.md)."""

    kind: Literal["movie", "movie+user", "movie-demographic"]
    item: str = "movie_id"
    user: str = "user_id"                                   # movie+user
    demographics: list[str] = ["gender", "scenario", "occupation"]   # movie-demographic
    smoothing: float = Field(100.0, ge=0)                   # pseudo-rows of shrinkage, as the baselines


class RateBlendSettings(StrictModel):
    """`model.rate_blend`: after training, each binary task's logit mixed with the rate baseline
    that scores best on validation, (1 - w) * network + w * rate, w per task chosen on validation
    from `weights` (hmtrec/models/ranking/rate_blend.py; docs/ranking.md)."""

    kinds: list[Literal["movie", "movie+user", "movie-demographic"]] = ["movie", "movie+user", "movie-demographic"]
    smoothings: list[float] = [5.0, 10.0, 30.0, 100.0]     # pseudo-rows of shrinkage tried per kind
    weights: list[float] = [round(0.1 * i, 1) for i in range(11)]
    item: str = "movie_id"
    user: str = "user_id"                                   # movie+user
    demographics: list[str] = ["gender", "scenario", "occupation"]   # movie-demographic

    @field_validator("kinds", "smoothings", "weights")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("give at least one value")
        return value

    @field_validator("smoothings")
    @classmethod
    def _non_negative(cls, value):
        if any(not v >= 0 for v in value):
            raise ValueError("smoothings are >= 0")
        return value

    @field_validator("weights")
    @classmethod
    def _unit_interval(cls, value):
        if any(not 0 <= v <= 1 for v in value):
            raise ValueError("weights are in [0, 1]")
        return sorted(set(value))


class RankingParams(StrictModel):
    """Parameters every ranking model has (the model section of the config adds its own)."""

    # fitted after training on validation (`hmtrec refit RUN --set model.rate_blend=...` fits them again)
    post_training_keys: ClassVar[tuple[str, ...]] = ("rate_blend",)

    embedding_dim: int = 16
    embedding_init_std: float = 1e-4
    scenario_as_feature: bool = True        # embed the scenario index as one more input column
    # training only: replace this share of categorical ids by the out-of-vocabulary index, so the
    # model learns to score rows whose id it has never seen (e.g. users absent from training).
    # One rate for every categorical column, or {column: rate}.
    oov_rate: float | dict[str, float] = 0.0
    tower_hidden: list[int] = [64]
    dropout: float = 0.0
    # L2 penalty on the embeddings (and `linear` terms) a batch looks up (mean over rows of the squared
    # norm, summed over fields), added to the loss: the embedding regulariser of torch-rechub / FuxiCTR, which keeps
    # rare ids (seen a few times) near the "no information" origin instead of fitting their noise
    embedding_l2: float = Field(0.0, ge=0)
    # weight decay on every embedding row (and `linear` term) at every step, as Adam's coupled
    # `weight_decay` does in torch-rechub / Scenario-Wise-Rec (there on all parameters): λ/2 · the
    # squared norm of the whole tables is added to the loss, so each row's gradient gains λ · row.
    # Unlike `embedding_l2` it also reaches rows the batch does not look up, and Adam's scaling makes
    # it pull rows that data rarely touches (rare users, zips) towards the "no information" origin
    embedding_weight_decay: float = Field(0.0, ge=0)
    # a first-order ("wide") term per task: one learned scalar per id of every categorical column,
    # summed into the task's logit (logistic regression on ids, as in Wide & Deep / DeepFM). It
    # carries the item and user effects directly, so the network does not have to learn them
    # through its experts; an out-of-vocabulary id adds 0
    linear: bool = False
    # a fixed offset per task: the logit of a smoothed rate fitted on the training rows (off: null), so
    # the network learns the residual of the rate baseline rather than the item effect itself
    rate_prior: RatePriorSettings | None = None
    # after training: the network's logit mixed with the best rate baseline's, the mix chosen on
    # validation (off: null); the shipped MovieLens configs turn it on (docs/ranking.md)
    rate_blend: RateBlendSettings | None = None


class LossSettings(StrictModel):
    """The `loss:` section: how task losses are combined (task weights come from `tasks:`)."""

    weighting: Literal["fixed", "uncertainty"] = "fixed"


class RankingModel(nn.Module):
    batch_contracts = (MULTI_TASK_ROWS,)   # the batches it reads (hmtrec.models.families)

    def __init__(self, params: RankingParams, layout: FeatureLayout, loss: LossSettings | None = None):
        super().__init__()
        self.params = params
        self.layout = layout
        self.task_names = layout.task_names
        self.task_types = [t.type for t in layout.tasks]
        self.embedding = FeatureEmbedding(layout, params.embedding_dim, params.embedding_init_std,
                                          params.scenario_as_feature)
        columns = [name for name, _ in layout.categorical]
        rates = params.oov_rate if isinstance(params.oov_rate, dict) else {c: params.oov_rate for c in columns}
        unknown = sorted(set(rates) - set(columns))
        if unknown:
            raise ValueError(f"model.oov_rate names columns that are not categorical features: {unknown}")
        self.register_buffer("oov_rates", torch.tensor([float(rates.get(c, 0.0)) for c in columns]),
                             persistent=False)
        self.linear = (LinearTerms(self.embedding, len(self.task_names))
                       if params.linear and layout.categorical else None)
        prior = params.rate_prior
        self.rate_prior = (RatePrior(layout, prior.kind, prior.item, prior.user, prior.demographics, prior.smoothing)
                           if prior is not None else None)
        blend = params.rate_blend
        self.rate_blend = (RateBlend(layout, blend.kinds, blend.item, blend.user, blend.demographics)
                           if blend is not None else None)
        loss = loss or LossSettings()
        self.weighting = build_weighting(loss.weighting, self.task_types, [t.weight for t in layout.tasks])

    def fit_rate_prior(self, rows) -> None:
        """Fit the `rate_prior` tables on the encoded training rows (no-op when it is off)."""
        if self.rate_prior is not None:
            self.rate_prior.fit(rows)

    @property
    def input_dim(self) -> int:
        return self.embedding.output_dim

    def drop_ids(self, batch: dict) -> dict:
        """The batch with `oov_rate` of its ids replaced by the out-of-vocabulary index (training only)."""
        if not (self.training and bool((self.oov_rates > 0).any())):
            return batch
        categorical = batch["categorical"]
        drop = torch.rand(categorical.shape, device=categorical.device) < self.oov_rates
        return {**batch, "categorical": categorical.masked_fill(drop, 0)}

    def embed(self, batch: dict) -> torch.Tensor:
        return self.embedding(batch)

    def task_logits(self, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """The model body: {task: logit or value} (each model file defines it)."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        batch = self.drop_ids(batch)          # the body and the linear term see the same ids
        outputs = self.task_logits(batch)
        offsets = [term(batch) for term in (self.linear, self.rate_prior) if term is not None]  # [B, n_tasks]
        if offsets:
            offset = sum(offsets)
            outputs = {name: outputs[name] + offset[:, i] for i, name in enumerate(self.task_names)}
        if self.rate_blend is not None and self.rate_blend.active:
            outputs = self.rate_blend.mix(outputs, batch, self.task_names)
        return outputs

    def outputs_matrix(self, batch: dict) -> torch.Tensor:
        outputs = self(batch)
        return torch.stack([outputs[name] for name in self.task_names], dim=1)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        outputs = self.outputs_matrix(batch)
        losses, counts = masked_task_losses(outputs, batch["labels"], batch["label_mask"], self.task_types)
        total = self.weighting(losses, (counts > 0).float())
        if self.params.embedding_l2 > 0:
            penalty = self.embedding.squared_norm(batch)
            if self.linear is not None:
                penalty = penalty + self.linear.weight(batch["categorical"] + self.linear.offsets).pow(2).sum((1, 2)).mean()
            total = total + self.params.embedding_l2 * penalty
        if self.params.embedding_weight_decay > 0:
            tables = [self.embedding.table.weight, *(e.weight for e in self.embedding.multi.values())]
            if self.linear is not None:
                tables.append(self.linear.weight.weight)
            total = total + 0.5 * self.params.embedding_weight_decay * sum(t.pow(2).sum() for t in tables)
        return total, {name: losses[i].detach() for i, name in enumerate(self.task_names)}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        outputs = self(batch)
        return {name: torch.sigmoid(outputs[name]) if kind == "binary" else outputs[name]
                for name, kind in zip(self.task_names, self.task_types)}
