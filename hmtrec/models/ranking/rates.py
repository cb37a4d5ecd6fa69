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

    def _check_fitted(self) -> None:
        if not self.tables:
            raise RuntimeError("RateBaseline used before fit")

    @staticmethod
    def _movie_logit(table: dict, items) -> np.ndarray:
        """logit of each row's movie rate (the prior for a movie absent from training)."""
        return _logit(pd.Series(items).map(table["movie"]).fillna(table["prior"]).to_numpy(dtype=np.float64))

    @staticmethod
    def _user_delta(table: dict, users) -> np.ndarray:
        """logit(user rate) - logit(prior): 0 for a user absent from training."""
        user = pd.Series(users).map(table["user"]).fillna(table["prior"]).to_numpy(dtype=np.float64)
        return _logit(user) - _logit(np.array(table["prior"]))

    @staticmethod
    def _demographic_delta(table: dict, column: str, items, values, movie_logit: np.ndarray) -> np.ndarray:
        """logit(rate of (movie, value)) - logit(movie rate): 0 for a pair absent from training."""
        index = pd.MultiIndex.from_arrays([np.asarray(items), np.asarray(values)])
        joint = table["demographic"][column].reindex(index).to_numpy(dtype=np.float64)
        joint = np.where(np.isnan(joint), _sigmoid(movie_logit), joint)
        return _logit(joint) - movie_logit

    def predict_logits(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """{task: the rate's logit per row}: the movie logit plus the user or demographic terms."""
        self._check_fitted()
        out = {}
        for task, table in self.tables.items():
            movie = self._movie_logit(table, frame[self.item].to_numpy())
            score = movie.copy()
            if "user" in table:
                score += self._user_delta(table, frame[self.user].to_numpy())
            for column in table.get("demographic", {}):
                score += self._demographic_delta(table, column, frame[self.item].to_numpy(),
                                                 frame[column].to_numpy(), movie)
            out[task] = score
        return out

    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {task: _sigmoid(score) for task, score in self.predict_logits(frame).items()}

    def logit_tables(self, sizes: dict[str, int]) -> dict[str, dict]:
        """The fitted logit as dense lookup tables over integer codes 0 .. sizes[column] - 1 (the rates
        must have been fitted on such codes), for a model to add per row (`model.rate_prior`):
        {task: {"movie": [n_items], "user": [n_users] (movie+user), "demographic": {column:
        [n_items, n_values]} (movie-demographic)}}; a row's logit is movie[item] + user[user] +
        Σ demographic[column][item, value], exactly `predict_logits`."""
        self._check_fitted()
        items = np.arange(sizes[self.item])
        out = {}
        for task, table in self.tables.items():
            movie = self._movie_logit(table, items)
            tables = {"movie": movie}
            if "user" in table:
                tables["user"] = self._user_delta(table, np.arange(sizes[self.user]))
            if "demographic" in table:
                tables["demographic"] = {}
                for column in table["demographic"]:
                    grid_items, grid_values = np.divmod(np.arange(len(items) * sizes[column]), sizes[column])
                    delta = self._demographic_delta(table, column, grid_items, grid_values, movie[grid_items])
                    tables["demographic"][column] = delta.reshape(len(items), sizes[column])
            out[task] = tables
        return out
