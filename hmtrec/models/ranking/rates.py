"""Simple-rate baselines for ranking rows: no network, just smoothed label rates counted on the
training rows. They are the floor every neural ranker must clear (a model that cannot beat its
movie's training click rate has not learnt the item effect).

- `movie`: the movie's training rate of the task, shrunk towards the global rate with
  `smoothing` pseudo-rows: (positives + smoothing * prior) / (rows + smoothing);
- `movie+user`: logit(movie rate) + logit(user rate) - logit(prior) (each shrunk the same way); a
  user absent from training contributes 0 (its rate is the prior);
- `movie-demographic`: logit(movie rate) plus, for each demographic column (gender, age group,
  occupation by default), logit(rate of (movie, value)) - logit(movie rate), where the (movie,
  value) rate is shrunk towards the movie's own rate: a naive-Bayes combination of the movie's
  rate among people like the row's user. Needs no user history, so it is the cold-user floor.

Rates are fitted per task and per scenario-free row (one rate for all scenarios; scenario-specific
behaviour enters through the age-group demographic). `RateBaseline(kind).fit(train, tasks)` then
`.predict(frame) -> {task: probabilities}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import pandas as pd

RateKind = Literal["movie", "movie+user", "movie-demographic"]
RATE_KINDS: dict[str, str] = {
    "movie": "Movie rate (no model)",
    "movie+user": "Movie + user rate (no model)",
    "movie-demographic": "Movie x demographic rates (no model)",
}
EPSILON = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@dataclass
class RateBaseline:
    kind: RateKind = "movie"
    item: str = "movie_id"
    user: str = "user_id"
    demographics: Sequence[str] = ("gender", "scenario", "occupation")
    smoothing: float = 10.0
    tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in RATE_KINDS:
            raise ValueError(f"unknown rate baseline {self.kind!r}; expected one of {list(RATE_KINDS)}")
        if self.smoothing < 0:
            raise ValueError("smoothing must be >= 0")

    @staticmethod
    def _rates(frame: pd.DataFrame, keys: list[str], task: str, prior: float | pd.Series, smoothing: float):
        counts = frame.groupby(keys, observed=True)[task].agg(["sum", "count"])
        if isinstance(prior, pd.Series):              # shrink towards a per-row parent rate
            prior = prior.reindex(counts.index.get_level_values(0)).to_numpy()
        return (counts["sum"] + smoothing * prior) / (counts["count"] + smoothing)

    def fit(self, train: pd.DataFrame, tasks: Sequence[str]) -> "RateBaseline":
        for task in tasks:
            labelled = train[train[task].notna()]
            prior = float(labelled[task].mean())
            movie = self._rates(labelled, [self.item], task, prior, self.smoothing)
            table = {"prior": prior, "movie": movie}
            if self.kind == "movie+user":
                table["user"] = self._rates(labelled, [self.user], task, prior, self.smoothing)
            if self.kind == "movie-demographic":
                table["demographic"] = {column: self._rates(labelled, [self.item, column], task, movie, self.smoothing)
                                        for column in self.demographics}
            self.tables[task] = table
        return self

    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        if not self.tables:
            raise RuntimeError("RateBaseline.predict before fit")
        out = {}
        for task, table in self.tables.items():
            prior = table["prior"]
            movie = frame[self.item].map(table["movie"]).fillna(prior).to_numpy(dtype=np.float64)
            score = _logit(movie)
            if "user" in table:
                user = frame[self.user].map(table["user"]).fillna(prior).to_numpy(dtype=np.float64)
                score = score + _logit(user) - _logit(np.array(prior))
            for column, rates in table.get("demographic", {}).items():
                index = pd.MultiIndex.from_arrays([frame[self.item], frame[column]])
                joint = pd.Series(rates.reindex(index).to_numpy(), index=frame.index)
                joint = joint.fillna(pd.Series(movie, index=frame.index)).to_numpy(dtype=np.float64)
                score = score + _logit(joint) - _logit(movie)
            out[task] = _sigmoid(score)
        return out
