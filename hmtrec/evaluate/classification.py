"""Exact, vectorised metrics for per-row predictions: AUC (ties handled by average ranks), logloss,
RMSE and MAE, overall and per group (scenario, facet value, ...) in one sorted pass.

Every function takes plain arrays. Rows whose label is NaN are left out (a missing label means the
task does not apply to that row). A group with only positives or only negatives has AUC NaN.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

LOGLOSS_EPS = 1e-7


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values)
    codes = np.zeros(len(values), dtype=np.int64)
    return _grouped_average_ranks(values, codes)


def _grouped_average_ranks(scores: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Average ranks of `scores` within each group code, for all groups at once."""
    n = len(scores)
    ranks = np.empty(n, dtype=np.float64)
    if n == 0:
        return ranks
    order = np.lexsort((scores, codes))
    sorted_scores, sorted_codes = scores[order], codes[order]
    index = np.arange(n)
    new_group = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, index, 0))
    position = index - group_start + 1                     # 1-based rank inside its group
    new_block = new_group | np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    block_id = np.cumsum(new_block) - 1
    block_first = position[new_block]
    block_last = np.r_[position[np.flatnonzero(new_block)[1:] - 1], position[-1]]
    ranks[order] = ((block_first + block_last) / 2.0)[block_id]
    return ranks


def binary_metrics_by_group(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
                            ) -> pd.DataFrame:
    """AUC, logloss, row and positive counts per group (one row per group value, index = group).

    `scores` are probabilities in [0, 1] (logloss clips them to [1e-7, 1 - 1e-7]); labels are 0/1
    or NaN (row left out). With `groups=None` there is one group named "all"."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if groups is None:
        groups = np.zeros(len(scores), dtype=np.int64)
        names = np.array(["all"], dtype=object)
        codes = groups
    else:
        names, codes = np.unique(np.asarray(groups), return_inverse=True)
    keep = ~np.isnan(labels)
    scores, labels, codes = scores[keep], labels[keep], codes[keep]
    n_groups = len(names)
    ranks = _grouped_average_ranks(scores, codes)
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    positives = np.bincount(codes, weights=labels, minlength=n_groups)
    negatives = n - positives
    positive_rank_sum = np.bincount(codes, weights=ranks * labels, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    auc[(positives == 0) | (negatives == 0)] = np.nan
    clipped = np.clip(scores, LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    row_loss = -(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped))
    with np.errstate(invalid="ignore", divide="ignore"):
        logloss = np.bincount(codes, weights=row_loss, minlength=n_groups) / n
    return pd.DataFrame({"auc": auc, "logloss": logloss, "n": n.astype(np.int64),
                         "positives": positives.astype(np.int64)}, index=pd.Index(names, name="group"))


def regression_metrics_by_group(predictions: np.ndarray, targets: np.ndarray, groups: np.ndarray | None = None
                                ) -> pd.DataFrame:
    """RMSE, MAE and row counts per group; NaN targets are left out."""
    predictions = np.asarray(predictions, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if groups is None:
        names, codes = np.array(["all"], dtype=object), np.zeros(len(predictions), dtype=np.int64)
    else:
        names, codes = np.unique(np.asarray(groups), return_inverse=True)
    keep = ~np.isnan(targets)
    error = predictions[keep] - targets[keep]
    codes = codes[keep]
    n = np.bincount(codes, minlength=len(names)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rmse = np.sqrt(np.bincount(codes, weights=error ** 2, minlength=len(names)) / n)
        mae = np.bincount(codes, weights=np.abs(error), minlength=len(names)) / n
    return pd.DataFrame({"rmse": rmse, "mae": mae, "n": n.astype(np.int64)},
                        index=pd.Index(names, name="group"))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exact, ties counted as half (average ranks)."""
    return float(binary_metrics_by_group(scores, labels)["auc"].iloc[0])


def logloss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_metrics_by_group(probabilities, labels)["logloss"].iloc[0])


def _clean(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    return value


def _metric_table(frame: pd.DataFrame, task: str, task_type: str, group_column: str | None) -> dict:
    groups = None if group_column is None else frame[group_column].astype(str).to_numpy()
    labels = frame[f"{task}_label"].to_numpy(dtype=np.float64)
    predictions = frame[task].to_numpy(dtype=np.float64)
    if task_type == "binary":
        table = binary_metrics_by_group(predictions, labels, groups)
    else:
        table = regression_metrics_by_group(predictions, labels, groups)
    columns = {key: table[key].to_numpy() for key in table.columns}
    return {str(name): {key: _clean(values[i]) for key, values in columns.items()}
            for i, name in enumerate(table.index)}


def task_metrics(frame: pd.DataFrame, tasks: Sequence[tuple[str, str]], scenario_column: str | None = None,
                 group_columns: Iterable[str] = ()) -> dict:
    """Metrics of a prediction table (columns `<task>` = prediction, `<task>_label` = label).

    Returns {"overall": {task: metrics}, "scenario": {scenario: {task: metrics}},
    "groups": {column: {value: {task: metrics}}}, "auc": mean AUC over (scenario, task) pairs
    (over tasks when there is no scenario), "logloss": the matching mean logloss}.
    """
    result: dict = {"overall": {}, "scenario": {}, "groups": {}}
    for task, task_type in tasks:
        result["overall"][task] = _metric_table(frame, task, task_type, None)["all"]
    columns = ([scenario_column] if scenario_column else []) + [c for c in group_columns if c != scenario_column]
    for column in columns:
        target = result["scenario"] if column == scenario_column else result["groups"].setdefault(column, {})
        for task, task_type in tasks:
            for value, metrics in _metric_table(frame, task, task_type, column).items():
                target.setdefault(value, {})[task] = metrics
    binary = [task for task, task_type in tasks if task_type == "binary"]
    cells = ([m[t] for m in result["scenario"].values() for t in binary if t in m] if scenario_column
             else [result["overall"][t] for t in binary])
    aucs = [c["auc"] for c in cells if c.get("auc") is not None]
    losses = [c["logloss"] for c in cells if c.get("logloss") is not None]
    result["auc"] = float(np.mean(aucs)) if aucs else None
    result["logloss"] = float(np.mean(losses)) if losses else None
    return result


def metrics_rows(metrics: dict, tasks: Sequence[tuple[str, str]], scenario_column: str | None = None) -> list[dict]:
    """Flatten `task_metrics` output into table rows: one per (slice, task)."""
    rows = []

    def add(slice_name: str, by_task: dict):
        for task, _ in tasks:
            if task in by_task:
                rows.append({"slice": slice_name, "task": task, **by_task[task]})
    add("overall", metrics["overall"])
    for value, by_task in metrics["scenario"].items():
        add(f"{scenario_column}={value}", by_task)
    for column, values in metrics["groups"].items():
        for value, by_task in values.items():
            add(f"{column}={value}", by_task)
    return rows
