"""Utility blending: rank each request's impressions by U = Σ_k w_k · f_k(p_k) and score the
ranking offline against the impressions' observed engagements.

Objectives (all maximised, all per request then averaged over requests):
- `ndcg`       NDCG@k of a weighted engagement gain g = Σ_k gain_k · y_k;
- `value`      mean gain of the top k impressions (value per shown impression);
- `head_ndcg`  NDCG@k of one head's own label.
Constraint: every head's NDCG@k under U must reach a fraction of its single-head optimum, the NDCG@k
it gets when the request is ranked by that head's own score alone.

Everything is vectorised over requests: the table is sorted by request once; each evaluation is one
lexicographic sort by (request, -U, random tie-break) and a few bincounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from hmtrec.calibrate.scores import ScoreTable
from hmtrec.config import StrictModel
from hmtrec.errors import ConfigError


class Transform(StrictModel):
    """f_k applied to a head's probability before weighting."""

    kind: Literal["identity", "log", "power"] = "identity"
    exponent: float = 1.0
    """For `power`: p ** exponent."""
    floor: float = 1e-6
    """For `log`: log(max(p, floor))."""

    def apply(self, p: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            return p
        if self.kind == "log":
            return np.log(np.maximum(p, self.floor))
        return np.power(p, self.exponent)


class Objective(StrictModel):
    name: Literal["ndcg", "value", "head_ndcg"] = "ndcg"
    k: int | None = 10
    """Cut-off (None: the whole request)."""
    gains: dict[str, float] = {}
    """Engagement value per head for `ndcg` and `value` (default 1 for every head)."""
    head: str | None = None
    """The head of `head_ndcg`."""

    @property
    def label(self) -> str:
        cut = f"@{self.k}" if self.k is not None else ""
        if self.name == "head_ndcg":
            return f"ndcg{cut}[{self.head}]"
        return f"{self.name}{cut}"


class Constraints(StrictModel):
    min_head_ndcg_ratio: float | dict[str, float] | None = None
    """Each head's NDCG@k under U >= ratio x its single-head optimum (a number for every head, or
    a mapping head -> ratio)."""
    k: int | None = 10


@dataclass
class Evaluation:
    objectives: dict[str, float]
    head_ndcg: dict[str, float]
    """Every head's NDCG at the constraint cut-off `head_k`."""
    constraint_slack: dict[str, float]
    """Per constrained head: required - achieved (<= 0 when satisfied), as Optuna expects."""
    head_k: int | None = 10

    @property
    def feasible(self) -> bool:
        return all(v <= 1e-12 for v in self.constraint_slack.values())


class UtilityEvaluator:
    """Scores weight vectors on a fixed table of impressions grouped by request."""

    def __init__(self, table: ScoreTable, objectives: list[Objective], constraints: Constraints | None = None,
                 transforms: dict[str, Transform] | None = None, seed: int = 0):
        if table.group_column is None:
            raise ConfigError("utility: the score table needs a request column (columns.group)")
        if not objectives:
            raise ConfigError("utility: name at least one objective")
        self.heads = list(table.heads)
        transforms = transforms or {}
        unknown = set(transforms) - set(self.heads)
        for objective in objectives:
            unknown |= set(objective.gains) - set(self.heads)
            if objective.name == "head_ndcg" and objective.head not in self.heads:
                raise ConfigError(f"utility: objective head_ndcg needs `head` among {self.heads}, "
                                  f"got {objective.head!r}")
        ratios = self._ratios(constraints)
        unknown |= set(ratios) - set(self.heads)
        if unknown:
            raise ConfigError(f"utility: unknown heads {sorted(unknown)}; heads are {self.heads}")
        labels = [o.label for o in objectives]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"utility: objectives repeat: {labels}")
        missing = [h for h in self.heads if h not in table.label_columns]
        if missing:
            raise ConfigError(f"utility: heads {missing} have no label column; labels are needed offline")

        codes, _ = pd.factorize(table.frame[table.group_column])
        sort = np.argsort(codes, kind="stable")
        self.codes = codes[sort]
        self.n_groups = int(self.codes.max()) + 1
        sizes = np.bincount(self.codes, minlength=self.n_groups)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.position = np.arange(len(self.codes)) - starts[self.codes]
        self.sizes = sizes
        self.features = np.stack([transforms.get(h, Transform()).apply(table.scores(h)[sort]) for h in self.heads], 1)
        # A row without a label for a head (NaN) counts as no engagement of that head.
        self.labels = np.nan_to_num(np.stack([table.labels(h)[sort] for h in self.heads], 1), nan=0.0)
        # A fixed random tie-break: equal utilities are ordered neither by input order nor by label.
        self.tiebreak = np.random.default_rng(seed).permutation(len(self.codes))
        self.objectives = list(objectives)
        self.constraints = constraints
        self.ratios = ratios
        self._cache: dict[tuple, np.ndarray] = {}  # ideal DCGs and discount vectors, computed once
        self.single_head_optimum = {h: self.head_ndcg(self._order(self.features[:, j]), h, constraints.k)
                                    for j, h in enumerate(self.heads) if h in ratios}
        empty = [h for h, v in self.single_head_optimum.items() if not np.isfinite(v)]
        if empty:
            raise ConfigError(f"utility: constrained heads {empty} have no positive label in any request")

    def _ratios(self, constraints: Constraints | None) -> dict[str, float]:
        if constraints is None or constraints.min_head_ndcg_ratio is None:
            return {}
        value = constraints.min_head_ndcg_ratio
        ratios = dict(value) if isinstance(value, dict) else {h: float(value) for h in self.heads}
        for head, ratio in ratios.items():
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"utility: constraints.min_head_ndcg_ratio.{head} must be in [0, 1], got {ratio}")
        return ratios

    # -- building blocks -------------------------------------------------------------------------
    def utility(self, weights: dict[str, float]) -> np.ndarray:
        missing = set(self.heads) - set(weights)
        if missing:
            raise ConfigError(f"utility: no weight for heads {sorted(missing)}")
        return self.features @ np.array([weights[h] for h in self.heads], dtype=np.float64)

    def _order(self, utility: np.ndarray) -> np.ndarray:
        """Rows sorted by request, then utility descending, then the random tie-break. Requests keep
        their blocks, so row i of the result sits at `self.position[i]` within its request."""
        return np.lexsort((self.tiebreak, -utility, self.codes))

    def _discount(self, k: int | None, graded: bool) -> np.ndarray:
        key = ("discount", k, graded)
        if key not in self._cache:
            self._cache[key] = self._make_discount(k, graded)
        return self._cache[key]

    def _make_discount(self, k: int | None, graded: bool) -> np.ndarray:
        inside = self.position < k if k is not None else np.ones(len(self.position), dtype=bool)
        return np.where(inside, 1.0 / np.log2(self.position + 2.0), 0.0) if graded else inside.astype(np.float64)

    def _gain(self, gains: dict[str, float]) -> np.ndarray:
        return self.labels @ np.array([gains.get(h, 1.0) for h in self.heads], dtype=np.float64)

    def _ndcg(self, order: np.ndarray, gain: np.ndarray, k: int | None, key: tuple) -> float:
        discount = self._discount(k, graded=True)
        dcg = np.bincount(self.codes, weights=gain[order] * discount, minlength=self.n_groups)
        if key not in self._cache:
            ideal_order = np.lexsort((-gain, self.codes))
            self._cache[key] = np.bincount(self.codes, weights=gain[ideal_order] * discount, minlength=self.n_groups)
        ideal = self._cache[key]
        has_gain = ideal > 0
        if not has_gain.any():
            return float("nan")
        return float(np.mean(dcg[has_gain] / ideal[has_gain]))

    def head_ndcg(self, order: np.ndarray, head: str, k: int | None) -> float:
        j = self.heads.index(head)
        return self._ndcg(order, self.labels[:, j], k, ("head", head, k))

    def _value(self, order: np.ndarray, gain: np.ndarray, k: int | None) -> float:
        shown = self._discount(k, graded=False)
        total = np.bincount(self.codes, weights=gain[order] * shown, minlength=self.n_groups)
        slots = np.minimum(self.sizes, k) if k is not None else self.sizes
        return float(np.mean(total / slots))

    # -- the public entry point --------------------------------------------------------------------
    def evaluate(self, weights: dict[str, float]) -> Evaluation:
        order = self._order(self.utility(weights))
        values = {}
        for objective in self.objectives:
            if objective.name == "head_ndcg":
                values[objective.label] = self.head_ndcg(order, objective.head, objective.k)
            elif objective.name == "ndcg":
                key = ("ndcg", tuple(sorted(objective.gains.items())), objective.k)
                values[objective.label] = self._ndcg(order, self._gain(objective.gains), objective.k, key)
            else:
                values[objective.label] = self._value(order, self._gain(objective.gains), objective.k)
        k = self.constraints.k if self.constraints is not None else 10
        per_head = {h: self.head_ndcg(order, h, k) for h in self.heads}
        slack = {h: ratio * self.single_head_optimum[h] - per_head[h] for h, ratio in self.ratios.items()}
        return Evaluation(values, per_head, slack, k)
