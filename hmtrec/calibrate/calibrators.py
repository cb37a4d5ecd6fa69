"""Calibrators: maps from a head's raw probability to a calibrated one.

Every calibrator is fitted on (probability, 0/1 label) pairs from a validation split and saved as
plain JSON (no pickles): Platt `a, b`; temperature `temperature`; isotonic breakpoints `x, y`;
down-sampling `keep_rate`. Working on the logit z = log(p / (1 - p)):

- Platt scaling:        q = sigmoid(a * z + b)
- temperature scaling:  q = sigmoid(z / T)
- isotonic regression:  q = the non-decreasing step fit of the labels (pool adjacent violators),
                        interpolated linearly between breakpoints and flat beyond them
- down-sampling:        q = p / (p + (1 - p) / w), w = the kept fraction of negatives in training
                        (the same as z + log w), exact for a model fitted on down-sampled data.

Platt (a > 0), temperature (T > 0) and the down-sampling correction are strictly increasing, so they
keep the order of a head's scores; isotonic regression is non-decreasing (it may tie, never swap).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from hmtrec.errors import ConfigError, DataError

EPS = 1e-12
LOGIT_CLIP = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    exp_z = np.exp(z[~positive])
    out[~positive] = exp_z / (1.0 + exp_z)
    return out


def _check_fit_inputs(p: np.ndarray, y: np.ndarray, weight: np.ndarray | None, name: str):
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise DataError(f"{name}: scores {p.shape} and labels {y.shape} must be 1-D of equal length")
    if len(p) == 0:
        raise DataError(f"{name}: cannot fit on zero rows")
    if not np.isfinite(p).all() or not np.isfinite(y).all():
        raise DataError(f"{name}: scores and labels must be finite")
    weight = np.ones_like(p) if weight is None else np.asarray(weight, dtype=np.float64)
    if weight.shape != p.shape or (weight < 0).any():
        raise DataError(f"{name}: sample weights must be non-negative, one per row")
    return p, y, weight


class Calibrator:
    """Base: `fit(p, y)`, `transform(p)`, and a JSON round trip through `to_dict` / `from_dict`."""

    method: ClassVar[str] = ""

    def fit(self, p: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "Calibrator":
        raise NotImplementedError

    def transform(self, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def monotone(self) -> bool:
        """True when the map never reverses the order of two scores."""
        return True

    def params(self) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.method, **self.params()}

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}=[{len(v)} values]"
                           for k, v in self.params().items())
        return f"{type(self).__name__}({values})"


def _newton_logistic(features: np.ndarray, y: np.ndarray, weight: np.ndarray, start: np.ndarray,
                     ridge: float = 1e-9, max_iter: int = 100, tol: float = 1e-12) -> np.ndarray:
    """Weighted logistic-regression maximum likelihood by Newton's method with backtracking.
    `features` is [n, d] (d tiny); the log loss is convex, so this reaches the optimum; the tiny
    ridge only keeps the step finite when the labels are separable."""
    theta = start.astype(np.float64).copy()
    scale_of_loss = max(1.0, float(weight.sum()))

    def loss(t):
        z = features @ t
        # log(1 + e^z) - y z, computed stably.
        return float(np.sum(weight * (np.logaddexp(0.0, z) - y * z))) + 0.5 * ridge * float(t @ t)

    current = loss(theta)
    for _ in range(max_iter):
        q = sigmoid(features @ theta)
        gradient = features.T @ (weight * (q - y)) + ridge * theta
        hessian = (features * (weight * q * (1.0 - q))[:, None]).T @ features + ridge * np.eye(len(theta))
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        decrement = float(gradient @ step)  # twice the predicted loss reduction of a full step
        if decrement <= 2.0 * tol * scale_of_loss:
            break
        size = 1.0
        while size > 1e-12:
            candidate = theta - size * step
            value = loss(candidate)
            if value <= current - 1e-4 * size * decrement:
                break
            size *= 0.5
        else:
            break  # no descent possible at machine precision: at the optimum
        theta, current = candidate, value
    return theta


class PlattCalibrator(Calibrator):
    """q = sigmoid(a * logit(p) + b), (a, b) by maximum likelihood on the validation labels."""

    method = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0):
        self.a, self.b = float(a), float(b)

    def fit(self, p, y, sample_weight=None):
        p, y, weight = _check_fit_inputs(p, y, sample_weight, "platt")
        features = np.stack([logit(p), np.ones_like(p)], axis=1)
        self.a, self.b = (float(v) for v in _newton_logistic(features, y, weight, np.array([1.0, 0.0])))
        return self

    def transform(self, p):
        return sigmoid(self.a * logit(p) + self.b)

    @property
    def monotone(self) -> bool:
        return self.a > 0

    def params(self):
        return {"a": self.a, "b": self.b}


class TemperatureCalibrator(Calibrator):
    """q = sigmoid(logit(p) / T), one parameter T > 0 by maximum likelihood. It rescales
    confidence but cannot move a wrong base rate: logit 0 (p = 0.5) stays at 0.5."""

    method = "temperature"

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def fit(self, p, y, sample_weight=None):
        p, y, weight = _check_fit_inputs(p, y, sample_weight, "temperature")
        z = logit(p)[:, None]
        (inverse,) = _newton_logistic(z, y, weight, np.array([1.0]))
        if inverse <= 1e-6:
            # The scores point the wrong way (or carry no signal): the best positive T is "infinite",
            # i.e. every probability 0.5. Keep a large finite T so the map stays increasing.
            inverse = 1e-6
        self.temperature = float(1.0 / inverse)
        return self

    def transform(self, p):
        return sigmoid(logit(p) / self.temperature)

    def params(self):
        return {"temperature": self.temperature}


class IsotonicCalibrator(Calibrator):
    """Isotonic (non-decreasing) regression of the labels on the scores; stored as breakpoints."""

    method = "isotonic"

    def __init__(self, x: list[float] | None = None, y: list[float] | None = None):
        self.x = np.asarray(x if x is not None else [0.0, 1.0], dtype=np.float64)
        self.y = np.asarray(y if y is not None else [0.0, 1.0], dtype=np.float64)
        if self.x.shape != self.y.shape or self.x.ndim != 1 or len(self.x) == 0:
            raise ConfigError("isotonic calibrator: breakpoints x and y must be equal-length lists")
        if (np.diff(self.x) < 0).any() or (np.diff(self.y) < 0).any():
            raise ConfigError("isotonic calibrator: breakpoints must be non-decreasing")

    def fit(self, p, y, sample_weight=None):
        from sklearn.isotonic import IsotonicRegression

        p, y, weight = _check_fit_inputs(p, y, sample_weight, "isotonic")
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(p, y, sample_weight=weight)
        self.x = np.asarray(model.X_thresholds_, dtype=np.float64)
        self.y = np.asarray(model.y_thresholds_, dtype=np.float64)
        return self

    def transform(self, p):
        p = np.asarray(p, dtype=np.float64)
        if len(self.x) == 1:
            return np.full_like(p, self.y[0])
        return np.interp(p, self.x, self.y)

    def params(self):
        return {"x": self.x.tolist(), "y": self.y.tolist()}


class DownsamplingCorrection(Calibrator):
    """Undo negative down-sampling: a model trained on data where only a fraction w of the negatives
    was kept overestimates the odds by 1/w; q = p / (p + (1 - p) / w) restores them. Not fitted."""

    method = "downsampling"

    def __init__(self, keep_rate: float = 1.0):
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ConfigError(f"down-sampling keep_rate (kept fraction of negatives) must be in (0, 1], "
                              f"got {keep_rate}")
        self.keep_rate = float(keep_rate)

    def fit(self, p, y, sample_weight=None):
        return self

    def transform(self, p):
        p = np.asarray(p, dtype=np.float64)
        w = self.keep_rate
        # p / (p + (1 - p) / w) == w p / (w p + 1 - p); the second form is finite at p = 0.
        return w * p / (w * p + (1.0 - p))

    def params(self):
        return {"keep_rate": self.keep_rate}


class IdentityCalibrator(Calibrator):
    """Leaves scores as they are (method `none`), so a report can show the raw scores beside others."""

    method = "none"

    def fit(self, p, y, sample_weight=None):
        return self

    def transform(self, p):
        return np.asarray(p, dtype=np.float64).copy()

    def params(self):
        return {}


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls for cls in (PlattCalibrator, TemperatureCalibrator, IsotonicCalibrator,
                                DownsamplingCorrection, IdentityCalibrator)
}


def make_calibrator(method: str, **params) -> Calibrator:
    if method not in CALIBRATORS:
        raise ConfigError(f"unknown calibration method {method!r}; known: {sorted(CALIBRATORS)}")
    return CALIBRATORS[method](**params)


def calibrator_from_dict(data: dict) -> Calibrator:
    data = dict(data)
    method = data.pop("method", None)
    if method not in CALIBRATORS:
        raise ConfigError(f"calibration step has unknown method {method!r}; known: {sorted(CALIBRATORS)}")
    try:
        return CALIBRATORS[method](**data)
    except TypeError as error:
        raise ConfigError(f"calibration step {method!r}: bad parameters {sorted(data)}: {error}") from None


class CalibrationChain:
    """Steps applied in order, e.g. the down-sampling correction then an isotonic fit on its output."""

    def __init__(self, steps: list[Calibrator]):
        self.steps = list(steps)

    def fit(self, p, y, sample_weight=None) -> "CalibrationChain":
        current = np.asarray(p, dtype=np.float64)
        for step in self.steps:
            step.fit(current, y, sample_weight)
            current = step.transform(current)
        return self

    def transform(self, p) -> np.ndarray:
        current = np.array(p, dtype=np.float64)  # a copy: callers may write into the result
        for step in self.steps:
            current = step.transform(current)
        return current

    @property
    def monotone(self) -> bool:
        return all(step.monotone for step in self.steps)

    @property
    def method(self) -> str:
        return "+".join(step.method for step in self.steps) or "none"

    def to_list(self) -> list[dict]:
        return [step.to_dict() for step in self.steps]

    @classmethod
    def from_list(cls, data: list[dict]) -> "CalibrationChain":
        return cls([calibrator_from_dict(item) for item in data])

    def __repr__(self) -> str:
        return f"CalibrationChain({self.steps!r})"


def build_chain(method: str, keep_rate: float | None = None) -> CalibrationChain:
    """The chain for one head: the down-sampling correction first (when its keep rate is known),
    then the fitted method (`none` adds nothing)."""
    steps: list[Calibrator] = []
    if keep_rate is not None and not math.isclose(keep_rate, 1.0):
        steps.append(DownsamplingCorrection(keep_rate))
    if method == "downsampling":
        if keep_rate is None:
            raise ConfigError("method 'downsampling' needs the kept fraction of negatives (downsampling: "
                              "{head: w})")
    elif method != "none":
        steps.append(make_calibrator(method))
    return CalibrationChain(steps)
