"""Synthetic engagement impressions whose true probabilities are known, so calibration error can be
measured against the truth rather than only against noisy labels.

Each impression (a request shows `items_per_request` items, in one of several scenarios) has
features x ~ N(0, I). Four engagement types form a small funnel:

    click       ~ Bernoulli(sigmoid(alpha_click + scenario shift + x . beta_click))
    long_click  = click and Bernoulli(q_long)        -> P(long_click) = P(click) q_long
    purchase    = click and Bernoulli(q_purchase)    -> P(purchase)   = P(click) q_purchase
    save        ~ Bernoulli(sigmoid(alpha_save + scenario shift + x . beta_save))

where the q's are logistic in x too. The columns `p_true_<head>` hold these marginal probabilities.

The "model" scores mimic a ranker trained elsewhere: score = sigmoid(a (logit p_true + noise) + b +
scenario offset), per head, i.e. over- or under-confident, shifted, noisy, and differently biased per
scenario. A head listed in `downsampling` gets the score a perfectly specified model would learn from
data that kept only a fraction w of that head's negatives: its odds are multiplied by 1/w, which the
down-sampling correction undoes exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmtrec.calibrate.calibrators import logit, sigmoid
from hmtrec.config import StrictModel
from hmtrec.errors import ConfigError

HEADS = ("click", "long_click", "save", "purchase")


class HeadDistortion(StrictModel):
    """How the simulated model's score deviates from the truth for one head."""

    slope: float = 1.0
    """a: > 1 over-confident, < 1 under-confident."""
    shift: float = 0.0
    """b: added to the logit (a wrong base rate)."""


class SyntheticEngagementSettings(StrictModel):
    n_requests: int = 2000
    items_per_request: int = 20
    n_features: int = 8
    scenarios: list[str] = ["home", "search", "related"]
    seed: int = 0
    base_logit: dict[str, float] = {"click": -2.6, "long_click": -0.5, "save": -4.2, "purchase": -2.5}
    """Intercepts: for click and save of the marginal probability; for long_click and purchase of the
    probability given a click."""
    scenario_effect: float = 0.4
    """Spread of the true per-scenario shift of every intercept (scenario s gets effect * (s - mid))."""
    signal: float = 1.0
    """Standard deviation of x . beta (how predictable engagement is)."""
    head_correlation: float = 0.6
    """Correlation of the heads' beta directions with a shared one."""
    score_noise: float = 0.3
    """Noise added to the true logit before distortion: the model is a good but imperfect ranker."""
    distortion: dict[str, HeadDistortion] = {
        "click": HeadDistortion(slope=1.4, shift=0.6),
        "long_click": HeadDistortion(slope=0.7, shift=-0.4),
        "save": HeadDistortion(slope=1.0, shift=1.0),
        "purchase": HeadDistortion(slope=1.2, shift=-0.8),
    }
    scenario_offset: float = 0.5
    """Spread of the model's per-scenario logit bias (a global calibrator cannot remove it)."""
    downsampling: dict[str, float] = {}
    """head -> w: score as if trained on data keeping a fraction w of that head's negatives."""


def _beta(rng: np.random.Generator, shared: np.ndarray, correlation: float, signal: float) -> np.ndarray:
    own = rng.standard_normal(len(shared))
    own /= np.linalg.norm(own)
    direction = correlation * shared + np.sqrt(max(0.0, 1.0 - correlation ** 2)) * own
    return signal * direction / np.linalg.norm(direction)


def make_engagement_data(settings: SyntheticEngagementSettings | None = None) -> pd.DataFrame:
    """One row per impression: request_id, scenario, features f0.., and per head the model score
    `<head>`, the label `<head>_label` and the true probability `p_true_<head>`."""
    s = settings or SyntheticEngagementSettings()
    unknown = (set(s.base_logit) ^ set(HEADS)) | (set(s.distortion) - set(HEADS)) | (set(s.downsampling) - set(HEADS))
    if unknown:
        raise ConfigError(f"synthetic engagement: unknown or missing heads {sorted(unknown)}; heads are {list(HEADS)}")
    for head, w in s.downsampling.items():
        if not 0.0 < w <= 1.0:
            raise ConfigError(f"synthetic engagement: downsampling.{head} must be in (0, 1], got {w}")
    if s.n_requests < 1 or s.items_per_request < 1 or s.n_features < 1 or not s.scenarios:
        raise ConfigError("synthetic engagement: n_requests, items_per_request, n_features and scenarios must be positive")
    rng = np.random.default_rng(s.seed)
    n = s.n_requests * s.items_per_request
    request = np.repeat(np.arange(s.n_requests), s.items_per_request)
    scenario_of_request = rng.integers(0, len(s.scenarios), s.n_requests)
    scenario_index = scenario_of_request[request]
    centred = scenario_index - (len(s.scenarios) - 1) / 2.0
    x = rng.standard_normal((n, s.n_features))
    # A request-level affinity shared by the items of one request makes requests differ, as real ones do.
    x[:, 0] = 0.7 * rng.standard_normal(s.n_requests)[request] + 0.7 * x[:, 0]
    shared = rng.standard_normal(s.n_features)
    shared /= np.linalg.norm(shared)

    def head_logit(head: str) -> np.ndarray:
        beta = _beta(rng, shared, s.head_correlation, s.signal)
        return s.base_logit[head] + s.scenario_effect * centred + x @ beta

    p_click = sigmoid(head_logit("click"))
    q_long = sigmoid(head_logit("long_click"))
    p_save = sigmoid(head_logit("save"))
    q_purchase = sigmoid(head_logit("purchase"))
    truth = {"click": p_click, "long_click": p_click * q_long, "save": p_save, "purchase": p_click * q_purchase}

    click = rng.random(n) < p_click
    labels = {"click": click, "long_click": click & (rng.random(n) < q_long),
              "save": rng.random(n) < p_save, "purchase": click & (rng.random(n) < q_purchase)}

    data: dict[str, np.ndarray] = {"request_id": request,
                                   "scenario": np.asarray(s.scenarios, dtype=object)[scenario_index]}
    for j in range(s.n_features):
        data[f"f{j}"] = x[:, j]
    for head in HEADS:
        distortion = s.distortion.get(head, HeadDistortion())
        offsets = s.scenario_offset * rng.standard_normal(len(s.scenarios))
        z = logit(truth[head])
        if head in s.downsampling:
            z = z - np.log(s.downsampling[head])  # odds inflated by 1/w
        z = z + s.score_noise * rng.standard_normal(n)
        data[head] = sigmoid(distortion.slope * z + distortion.shift + offsets[scenario_index])
        data[f"{head}_label"] = labels[head].astype(np.int8)
        data[f"p_true_{head}"] = truth[head]
    return pd.DataFrame(data)


def split_by_request(frame: pd.DataFrame, fractions=(0.6, 0.2, 0.2), seed: int = 0,
                     group_column: str = "request_id") -> dict[str, pd.DataFrame]:
    """Random train / valid / test split of whole requests (no request straddles two splits)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups = frame[group_column].unique()
    order = np.random.default_rng(seed).permutation(len(groups))
    cut = np.cumsum(np.round(np.array(fractions[:2]) * len(groups)).astype(int))
    part = np.empty(len(groups), dtype=object)
    part[order[:cut[0]]], part[order[cut[0]:cut[1]]], part[order[cut[1]:]] = "train", "valid", "test"
    assigned = pd.Series(part, index=groups).reindex(frame[group_column]).to_numpy()
    return {name: frame[assigned == name].reset_index(drop=True) for name in ("train", "valid", "test")}


def downsample_negatives(frame: pd.DataFrame, label_column: str, keep_rate: float, seed: int = 0
                         ) -> tuple[pd.DataFrame, dict]:
    """Keep every row whose label is 1 and a random fraction `keep_rate` of the others.
    Returns the kept rows and a report of what was removed."""
    if label_column not in frame.columns:
        raise ConfigError(f"downsample_negatives: no column {label_column!r}")
    if not 0.0 < keep_rate <= 1.0:
        raise ConfigError(f"downsample_negatives: keep_rate must be in (0, 1], got {keep_rate}")
    negative = frame[label_column].to_numpy() == 0
    keep = ~negative | (np.random.default_rng(seed).random(len(frame)) < keep_rate)
    report = {"filter": f"negative down-sampling of {label_column} (keep_rate={keep_rate})",
              "rows_before": int(len(frame)), "rows_after": int(keep.sum()),
              "negatives_removed": int((negative & ~keep).sum())}
    return frame[keep].reset_index(drop=True), report
