"""Evaluation of next-destination models at coarse geographic levels.

For every example and every level the model scores: the exact rank of the target's node
(`hmtrec.evaluate.metrics.target_ranks`, ties broken by index), from which Acc@K (= hit rate at K)
and MRR (mean reciprocal rank over all nodes, no cut-off) follow. Results are reported overall, for
active and dormant examples separately, and by how frequent the target's node (e.g. its cell) was
in training, since rare destinations are where a hierarchy should help most.

The hierarchy-violation rate is the share of examples whose top node at a fine level does not lie
inside the top node of the next coarser level (top cell outside the top region).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import Field, field_validator

from hmtrec.config import StrictModel
from hmtrec.data.actions import KIND_NAMES, ActionStreams, Examples
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.evaluate.metrics import target_ranks
from hmtrec.progress import progress_bar


class GeoEvalSettings(StrictModel):
    ks: list[int] = Field(default_factory=lambda: [1, 5])
    frequency_level: str | None = None    # level whose training frequency makes the buckets; default: finest scored
    frequency_edges: list[int] = Field(default_factory=lambda: [10, 100, 1000])  # training events per node
    batch_size: int = Field(1024, ge=1)

    @field_validator("ks", "frequency_edges")
    @classmethod
    def _increasing(cls, values: list[int]) -> list[int]:
        if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] < 1:
            raise ValueError("must be a non-empty, strictly increasing list of positive integers")
        return values


def frequency_bucket_names(edges: list[int]) -> list[str]:
    names = [f"<{edges[0]}"]
    names += [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:])]
    return names + [f">={edges[-1]}"]


def node_frequencies(taxonomy: Taxonomy, leaves: np.ndarray, level: str) -> np.ndarray:
    """How many of the given (training) events fall under each node of `level`."""
    return np.bincount(taxonomy.ancestors(np.asarray(leaves, dtype=np.int64), level),
                       minlength=taxonomy.n_nodes(level))


def rank_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Acc@K and MRR from exact ranks (NaN when there are no examples)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {**{f"Acc@{k}": float("nan") for k in ks}, "MRR": float("nan")}
    return {**{f"Acc@{k}": float((ranks <= k).mean()) for k in ks}, "MRR": float((1.0 / ranks).mean())}


@torch.no_grad()
def score_examples(model, streams: ActionStreams, examples: Examples, *, batch_size: int = 1024,
                   description: str = "scoring") -> dict[str, dict[str, np.ndarray]]:
    """Per level: `rank` of the target node and `top` (the best-scored node) for every example."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.zeros(0)).device   # non-neural models have no parameters
    taxonomy = model.taxonomy
    out = {level: {"rank": np.empty(len(examples)), "top": np.empty(len(examples), dtype=np.int64)}
           for level in model.levels}
    starts = range(0, len(examples), batch_size)
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(starts), info="")
        for start in starts:
            rows = np.arange(start, min(start + batch_size, len(examples)))
            batch = {key: value.to(device) for key, value in streams.batch(examples, rows).items()}
            scores = model.predict(batch)
            for level, level_scores in scores.items():
                targets = torch.from_numpy(taxonomy.ancestors(examples.target[rows], level)).to(device)
                out[level]["rank"][rows] = target_ranks(level_scores, targets).cpu().numpy()
                out[level]["top"][rows] = level_scores.argmax(1).cpu().numpy()
            bar.advance(task)
    model.train(was_training)
    return out


def violation_rates(taxonomy: Taxonomy, tops: dict[str, np.ndarray], rows: np.ndarray | None = None
                    ) -> dict[str, float]:
    """For consecutive scored levels (coarse, fine): share of rows whose top fine node lies outside
    the top coarse node. Keyed "fine_in_coarse"."""
    levels = sorted(tops, key=taxonomy.level_index)
    out = {}
    for coarse, fine in zip(levels, levels[1:]):
        top_fine, top_coarse = tops[fine], tops[coarse]
        if rows is not None:
            top_fine, top_coarse = top_fine[rows], top_coarse[rows]
        inside = taxonomy.node_ancestors(top_fine, fine, coarse) == top_coarse
        out[f"{fine}_in_{coarse}"] = float(1.0 - inside.mean()) if len(inside) else float("nan")
    return out


def evaluate_geo(model, streams: ActionStreams, examples: Examples, settings: GeoEvalSettings, *,
                 train_leaves: np.ndarray) -> dict:
    """Metrics of a model on examples; `train_leaves` are the training events (for frequency buckets).

    Returns {"n_examples", "seconds", "counts": {kind: n}, "overall": {level: metrics},
    "by_kind": {kind: {level: metrics}}, "by_frequency": {"level", "edges", "buckets": {bucket:
    {"n", level: metrics}}}, "violation_rate": {pair: rate}, "violation_rate_by_kind": {kind: {pair: rate}}}.
    """
    taxonomy = model.taxonomy
    started = time.perf_counter()
    scored = score_examples(model, streams, examples, batch_size=settings.batch_size)
    seconds = time.perf_counter() - started
    levels = list(scored)
    frequency_level = settings.frequency_level or levels[-1]
    if frequency_level not in scored:
        raise ValueError(f"eval.frequency_level {frequency_level!r} is not scored by the model ({levels})")

    def metrics_for(rows: np.ndarray) -> dict[str, dict[str, float]]:
        return {level: rank_metrics(scored[level]["rank"][rows], settings.ks) for level in levels}

    everything = np.arange(len(examples))
    tops = {level: scored[level]["top"] for level in levels}
    by_kind, violation_by_kind = {}, {}
    for code, name in enumerate(KIND_NAMES):
        rows = np.flatnonzero(examples.kind == code)
        by_kind[name] = metrics_for(rows)
        violation_by_kind[name] = violation_rates(taxonomy, tops, rows)

    frequency = node_frequencies(taxonomy, train_leaves, frequency_level)
    target_frequency = frequency[taxonomy.ancestors(examples.target, frequency_level)]
    bucket = np.searchsorted(np.asarray(settings.frequency_edges), target_frequency, side="right")
    buckets = {}
    for index, name in enumerate(frequency_bucket_names(settings.frequency_edges)):
        rows = np.flatnonzero(bucket == index)
        buckets[name] = {"n": int(len(rows)), **metrics_for(rows)}
    return {
        "n_examples": int(len(examples)),
        "seconds": seconds,
        "counts": examples.counts(),
        "overall": metrics_for(everything),
        "by_kind": by_kind,
        "by_frequency": {"level": frequency_level, "edges": list(settings.frequency_edges), "buckets": buckets},
        "violation_rate": violation_rates(taxonomy, tops),
        "violation_rate_by_kind": violation_by_kind,
    }


def geo_rows(results_by_model: dict[str, dict], view: str = "overall", ks: list[int] | None = None) -> list[dict]:
    """Flat table rows: one per (model, group, level). `view` is "overall", "by_kind" or "by_frequency"."""
    rows = []
    for model_name, results in results_by_model.items():
        if view == "overall":
            groups = {"all": results["overall"]}
        elif view == "by_kind":
            groups = results["by_kind"]
        elif view == "by_frequency":
            groups = {name: {k: v for k, v in bucket.items() if k != "n"}
                      for name, bucket in results["by_frequency"]["buckets"].items()}
        else:
            raise ValueError(f"unknown view {view!r}")
        for group, per_level in groups.items():
            for level, metrics in per_level.items():
                row = {"model": model_name, "group": group, "level": level}
                if view == "by_frequency":
                    row["n"] = results["by_frequency"]["buckets"][group]["n"]
                elif view == "by_kind":
                    row["n"] = results["counts"][group]
                row.update(metrics)
                rows.append(row)
    return rows


def print_geo_results(results_by_model: dict[str, dict]) -> None:
    """Rich tables of the overall and active/dormant metrics plus violation rates."""
    from rich.table import Table

    from hmtrec.progress import console

    for view in ("overall", "by_kind"):
        rows = geo_rows(results_by_model, view)
        if not rows:
            continue
        table = Table(title=f"geo metrics ({view.replace('_', ' ')})")
        for column in rows[0]:
            table.add_column(column, justify="left" if column in ("model", "group", "level") else "right")
        for row in rows:
            table.add_row(*[f"{value:.4f}" if isinstance(value, float) else str(value) for value in row.values()])
        console.print(table)
    for model_name, results in results_by_model.items():
        rates = ", ".join(f"{pair}: {rate:.4f}" for pair, rate in results["violation_rate"].items())
        if rates:
            console.print(f"{model_name}: hierarchy-violation rate (top fine node outside top coarse node) {rates}")
