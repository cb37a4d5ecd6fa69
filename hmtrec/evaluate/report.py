"""Tables of evaluation results: Markdown for files and docs, rich tables for the console.

Inputs are the dicts `hmtrec.evaluate.ranking.evaluate_model` returns, keyed by model name. Models
are rows; columns are level x metric, in a full-catalogue section, a candidate-mode section and a
breakdown by the target item's training frequency (bucket x metric at the finest level).
"""

from __future__ import annotations

from typing import Iterable

from rich.table import Table

from hmtrec.bench.report import markdown_table
from hmtrec.evaluate.metrics import metric_names
from hmtrec.progress import console


def _levels(results_by_model: dict[str, dict], levels: Iterable[str] | None) -> list[str]:
    if levels is not None:
        return list(levels)
    seen: list[str] = []
    for result in results_by_model.values():
        for name in result.get("levels", result.get("full", {}).keys()):
            if name not in seen:
                seen.append(name)
    return seen


def _metrics(results_by_model: dict[str, dict], metrics: Iterable[str] | None) -> list[str]:
    if metrics is not None:
        return list(metrics)
    ks = sorted({k for result in results_by_model.values() for k in result.get("ks", [])})
    return metric_names(ks)


def _rows(results_by_model: dict[str, dict], mode: str, levels: list[str], metrics: list[str]) -> list[dict]:
    rows = []
    for model, result in results_by_model.items():
        if mode not in result:
            continue
        row: dict = {"model": model}
        for level in levels:
            values = result[mode].get(level, {})
            for metric in metrics:
                row[f"{level} {metric}"] = values.get(metric, "–")
        if mode == "full":
            row["cases"] = result.get("n_cases", "")
            row["eval s"] = f"{result['seconds']:.1f}" if "seconds" in result else ""
        else:
            row["coverage"] = result.get("candidate_coverage", "")
            row["fraction"] = result.get("candidate_fraction", "")
        rows.append(row)
    return rows


def _candidate_caption(results_by_model: dict[str, dict]) -> str:
    described = set()
    for result in results_by_model.values():
        settings = result.get("candidate_settings")
        if not settings:
            continue
        size = f"k={settings['k']}" if settings.get("k") is not None else f"fraction {settings['fraction']}"
        described.add(f"top {settings['level']} nodes, {settings['mode']} ({size})")
    return "; ".join(sorted(described))


def results_table(results_by_model: dict[str, dict], *, metrics: Iterable[str] | None = None,
                  levels: Iterable[str] | None = None, float_format: str = "{:.4f}") -> str:
    """Markdown: a full-catalogue table and, when any model was evaluated with candidates, a
    candidate-mode table with coverage (share of targets among the candidates) and the mean
    candidate fraction of the catalogue."""
    levels, metrics = _levels(results_by_model, levels), _metrics(results_by_model, metrics)
    parts = ["**Full catalogue**\n", markdown_table(_rows(results_by_model, "full", levels, metrics),
                                                    float_format=float_format)]
    candidate_rows = _rows(results_by_model, "candidate", levels, metrics)
    if candidate_rows:
        parts += [f"\n**Candidates** ({_candidate_caption(results_by_model)}; a target outside the candidates "
                  "is a miss)\n", markdown_table(candidate_rows, float_format=float_format)]
    if any(FREQUENCY_SEGMENT in result.get("segments", {}) for result in results_by_model.values()):
        level = levels[-1] if levels else None
        largest_k = max((k for result in results_by_model.values() for k in result.get("ks", [])), default=None)
        breakdown_metrics = [f"Recall@{largest_k}", f"MRR@{largest_k}"] if largest_k else []
        parts += [f"\n**By the target item's training frequency** ({level}; cases per bucket in brackets)\n",
                  breakdown_table(results_by_model, FREQUENCY_SEGMENT, level=level, metrics=breakdown_metrics,
                                  float_format=float_format)]
    return "\n".join(parts)


FREQUENCY_SEGMENT = "target_frequency"


def breakdown_table(results_by_model: dict[str, dict], segment: str, *, level: str | None = None,
                    metrics: Iterable[str], float_format: str = "{:.4f}") -> str:
    """Markdown: models as rows, one column per (bucket of `segment`, metric) of the full-catalogue
    metrics at `level` (default: each result's finest level); a model without that segment shows
    "–". Bucket headers carry the case count (the same for every model evaluated on one split)."""
    metrics = list(metrics)
    buckets: list[str] = []
    counts: dict[str, int] = {}
    for result in results_by_model.values():
        for bucket, count in result.get("segment_cases", {}).get(segment, {}).items():
            if bucket not in buckets:
                buckets.append(bucket)
            counts.setdefault(bucket, count)
    rows = []
    for model, result in results_by_model.items():
        by_bucket = result.get("segments", {}).get(segment, {})
        at = level or (result.get("levels") or [None])[-1]
        row: dict = {"model": model}
        for bucket in buckets:
            values = by_bucket.get(bucket, {}).get(at, {})
            for metric in metrics:
                row[f"{bucket} ({counts[bucket]:,}) {metric}"] = values.get(metric, "–")
        rows.append(row)
    return markdown_table(rows, float_format=float_format)


def segments_table(result: dict, segment: str, *, level: str | None = None,
                   metrics: Iterable[str] | None = None, float_format: str = "{:.4f}") -> str:
    """Markdown: one row per bucket of `segment` (case count, full metrics and, in candidate mode,
    candidate metrics and coverage) at `level` (default: the finest evaluated level)."""
    if segment not in result.get("segments", {}):
        raise KeyError(f"no segment {segment!r}; have {sorted(result.get('segments', {}))}")
    level = level or result["levels"][-1]
    metrics = list(metrics) if metrics is not None else metric_names(result["ks"])
    rows = []
    candidate = result.get("candidate_segments", {}).get(segment)
    for bucket, by_level in result["segments"][segment].items():
        row: dict = {segment: bucket, "cases": result["segment_cases"][segment][bucket]}
        row.update({metric: by_level[level][metric] for metric in metrics})
        if candidate is not None:
            row.update({f"cand {metric}": candidate[bucket][level][metric] for metric in metrics})
            row["coverage"] = result["segment_coverage"][segment][bucket]
        rows.append(row)
    return markdown_table(rows, float_format=float_format)


def rich_tables(results_by_model: dict[str, dict], *, metrics: Iterable[str] | None = None,
                levels: Iterable[str] | None = None) -> list[Table]:
    """The content of `results_table` as rich Tables narrow enough for a terminal: one row per
    (model, level), one column per metric."""
    levels, metrics = _levels(results_by_model, levels), _metrics(results_by_model, metrics)
    tables = []
    sections = [("full", "Full catalogue"), ("candidate", f"Candidates ({_candidate_caption(results_by_model)})")]
    for mode, title in sections:
        models = [model for model, result in results_by_model.items() if mode in result]
        if not models:
            continue
        table = Table(title=title, title_justify="left")
        extra = ["cases", "eval s"] if mode == "full" else ["coverage", "fraction"]
        for column in ["model", "level", *metrics, *extra]:
            table.add_column(column, justify="left" if column in ("model", "level") else "right")
        for model in models:
            result = results_by_model[model]
            for position, level in enumerate(levels):
                values = result[mode].get(level, {})
                cells = [model if position == 0 else "", level]
                cells += [f"{values[metric]:.4f}" if metric in values else "–" for metric in metrics]
                if position > 0:
                    cells += ["", ""]
                elif mode == "full":
                    cells += [str(result.get("n_cases", "")), f"{result.get('seconds', 0.0):.1f}"]
                else:
                    cells += [f"{result['candidate_coverage']:.4f}", f"{result['candidate_fraction']:.4f}"]
                table.add_row(*cells, end_section=position == len(levels) - 1)
        tables.append(table)
    return tables


def print_results(results_by_model: dict[str, dict], **options) -> None:
    """Print `rich_tables` to the hmtrec console."""
    for table in rich_tables(results_by_model, **options):
        console.print(table)
