"""Calibration metrics for one head: expected calibration error, Brier score, the ratio Σp / Σy,
log loss and AUC, the reliability curve behind the diagram, and, when the true probabilities are
known (synthetic data), the error against the truth.

All functions take 1-D numpy arrays of probabilities and 0/1 labels and are vectorised.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from hmtrec.evaluate.classification import auc, logloss as log_loss  # one AUC / log loss for the package

__all__ = ["auc", "log_loss", "bin_index", "reliability_curve", "expected_calibration_error", "brier_score",
           "calibration_ratio", "calibration_metrics"]

BinStrategy = Literal["uniform", "quantile"]


def _as_arrays(p, y):
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} must be 1-D of equal length")
    return p, y


def bin_index(p: np.ndarray, n_bins: int, strategy: BinStrategy = "uniform") -> np.ndarray:
    """Bin of each probability. `uniform`: [0, 1/n), ..., [(n-1)/n, 1]; `quantile`: equal-count
    bins on the observed scores (fewer bins when scores repeat)."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if strategy == "uniform":
        return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
        return np.searchsorted(edges, p, side="right")
    raise ValueError(f"unknown bin strategy {strategy!r}; use 'uniform' or 'quantile'")


def reliability_curve(p, y, n_bins: int = 15, strategy: BinStrategy = "uniform") -> pd.DataFrame:
    """Per non-empty bin: count, mean predicted probability, observed positive rate."""
    p, y = _as_arrays(p, y)
    bins = bin_index(p, n_bins, strategy)
    size = int(bins.max()) + 1 if len(bins) else 0
    count = np.bincount(bins, minlength=size)
    predicted = np.bincount(bins, weights=p, minlength=size)
    observed = np.bincount(bins, weights=y, minlength=size)
    keep = count > 0
    return pd.DataFrame({"bin": np.flatnonzero(keep), "count": count[keep],
                         "mean_predicted": predicted[keep] / count[keep],
                         "observed_rate": observed[keep] / count[keep]})


def expected_calibration_error(p, y, n_bins: int = 15, strategy: BinStrategy = "uniform") -> float:
    """Σ_bins (n_b / N) |mean p_b − mean y_b|."""
    curve = reliability_curve(p, y, n_bins, strategy)
    if curve.empty:
        return float("nan")
    weights = curve["count"].to_numpy() / curve["count"].sum()
    return float(np.sum(weights * np.abs(curve["mean_predicted"] - curve["observed_rate"])))


def brier_score(p, y) -> float:
    p, y = _as_arrays(p, y)
    return float(np.mean((p - y) ** 2))


def calibration_ratio(p, y) -> float:
    """Σp / Σy: 1 when the head predicts as many engagements as happen; nan without positives."""
    p, y = _as_arrays(p, y)
    positives = y.sum()
    return float(p.sum() / positives) if positives > 0 else float("nan")


def calibration_metrics(p, y, *, true_p=None, n_bins: int = 15, strategy: BinStrategy = "uniform") -> dict:
    """Every metric for one head. With `true_p`, also the mean absolute and the root mean squared
    error against the true probabilities, and the true base rate beside the predicted one."""
    p, y = _as_arrays(p, y)
    out = {
        "rows": int(len(p)),
        "positives": int(y.sum()),
        "base_rate": float(y.mean()),
        "mean_predicted": float(p.mean()),
        "ece": expected_calibration_error(p, y, n_bins, strategy),
        "brier": brier_score(p, y),
        "ratio": calibration_ratio(p, y),
        "log_loss": log_loss(p, y),
        "auc": auc(p, y),
    }
    if true_p is not None:
        true_p = np.asarray(true_p, dtype=np.float64)
        out["true_base_rate"] = float(true_p.mean())
        out["true_mae"] = float(np.mean(np.abs(p - true_p)))
        out["true_rmse"] = float(np.sqrt(np.mean((p - true_p) ** 2)))
    return out
