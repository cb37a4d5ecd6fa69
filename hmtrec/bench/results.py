"""Turn run records into a results folder: summary table (Markdown), CSVs, plots.

Per model: every metric as mean ± std over its seeds (sample std; a deterministic model ran once
and shows its single value), training seconds per epoch, evaluation seconds per 10k test cases,
peak memory of the run's process, parameter count, and time to the suite's quality target.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from hmtrec.bench.runner import RunRecord
from hmtrec.bench.suites import Suite


@dataclass
class ModelSummary:
    label: str
    group: str
    runs: list[RunRecord]
    failed: list[RunRecord]

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, metric: str, candidate: bool = False) -> list[float]:
        source = (lambda r: r.candidate_metrics) if candidate else (lambda r: r.metrics)
        return [source(r)[metric] for r in self.runs if metric in source(r)]

    def stat(self, values: list[float]) -> tuple[float, float] | None:
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def mean_of(self, attribute: str) -> float | None:
        values = [getattr(r, attribute) for r in self.runs if getattr(r, attribute) is not None]
        return statistics.fmean(values) if values else None


def summarize(suite: Suite, records: list[RunRecord]) -> list[ModelSummary]:
    order = [model.label for model in suite.models]
    summaries = []
    for label in sorted({r.label for r in records}, key=lambda name: order.index(name) if name in order else 1e9):
        mine = [r for r in records if r.label == label]
        summaries.append(ModelSummary(label, mine[0].group, [r for r in mine if r.status == "done"],
                                      [r for r in mine if r.status != "done"]))
    return summaries


def format_stat(stat: tuple[float, float] | None, n: int, scale: float = 100.0) -> str:
    """Metrics are shown ×100 (percent), as in the session-based literature."""
    if stat is None:
        return "—"
    mean, std = stat
    return f"{mean * scale:.2f}" if n <= 1 else f"{mean * scale:.2f} ± {std * scale:.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def time_to_quality_cell(summary: ModelSummary, suite: Suite) -> str:
    if suite.quality is None:
        return "—"
    if all(not r.history for r in summary.runs):
        return "n/a"
    reached = [r.time_to_quality(suite.quality.metric, suite.quality.value) for r in summary.runs]
    times = [seconds for seconds, _ in reached if seconds is not None]
    if not times:
        return "not reached"
    text = f"{statistics.fmean(times):.0f} s"
    cpu = [r.cpu_seconds_to_quality(suite.quality.metric, suite.quality.value) for r in summary.runs]
    cpu = [seconds for seconds in cpu if seconds is not None]
    if len(cpu) == len(times):
        text += f" (CPU {statistics.fmean(cpu):.0f} s)"
    return text if len(times) == len(reached) else f"{text} ({len(times)}/{len(reached)} runs)"


def best_valid_cell(summary: ModelSummary, suite: Suite) -> str:
    """The quality metric at each run's best validation epoch (validation cases come from the
    training data), or of the model as finally chosen where a choice after training changed it
    (knn-hybrid's weight), mean ± std over the runs that validated: what a choice of settings may read."""
    if suite.quality is None:
        return "—"
    metric, key = suite.quality.metric, f"valid_{suite.quality.metric}"

    def chosen(run) -> float | None:
        if metric in run.tuned_valid:
            return run.tuned_valid[metric]
        return max((record[key] for record in run.history if key in record), default=None)

    best = [value for value in map(chosen, summary.runs) if value is not None]
    return format_stat(summary.stat(best), len(best)) if best else "n/a"


def summary_rows(suite: Suite, summaries: list[ModelSummary]) -> list[dict[str, str]]:
    rows = []
    for summary in summaries:
        row = {"model": summary.label, "group": summary.group,
               "runs": f"{summary.n}" + (f" (+{len(summary.failed)} failed)" if summary.failed else "")}
        for metric in suite.metrics:
            row[metric] = format_stat(summary.stat(summary.values(metric)), summary.n)
        # candidate mode: the first table metric the runs report in candidate mode (a leaf-level one)
        candidate_metric = next((m for m in suite.metrics if summary.values(m, candidate=True)), None)
        if candidate_metric:
            fraction = summary.mean_of("candidate_fraction")
            row[f"cand. {candidate_metric}"] = format_stat(summary.stat(summary.values(candidate_metric, True)),
                                                           summary.n)
            row["cand. coverage"] = format_stat(summary.stat(
                [r.candidate_coverage for r in summary.runs if r.candidate_coverage is not None]), summary.n)
            row["cand. fraction"] = f"{fraction * 100:.1f}%" if fraction is not None else "—"
        epoch = summary.mean_of("epoch_seconds")
        row["train s/epoch"] = _seconds(epoch) if epoch is not None else f"fit {_seconds(summary.mean_of('fit_seconds'))}"
        row["eval s/10k cases"] = _seconds(summary.mean_of("eval_seconds_per_10k"))
        peak = summary.mean_of("peak_rss_mb")
        row["peak RSS MB"] = f"{peak:,.0f}" if peak else "—"
        wall, cpu = summary.mean_of("wall_seconds"), summary.mean_of("cpu_seconds")
        row["run CPU/wall s"] = f"{cpu:.0f}/{wall:.0f}" if wall else "—"
        parameters = summary.mean_of("parameters")
        row["params"] = f"{parameters / 1e6:.2f}M" if parameters else "0"
        if suite.quality is not None:
            row[f"time to {suite.quality.metric} ≥ {suite.quality.value:g}"] = time_to_quality_cell(summary, suite)
            row[f"best valid {suite.quality.metric}"] = best_valid_cell(summary, suite)
        rows.append(row)
    return rows


def markdown_summary(suite: Suite, summaries: list[ModelSummary]) -> str:
    from hmtrec.bench.report import markdown_table

    rows = summary_rows(suite, summaries)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = markdown_table(rows, columns)
    if suite.references:
        reference_rows = [{"reference": ref.label, "source": ref.source,
                           **{metric: f"{value * 100:.2f}" for metric, value in ref.metrics.items()}}
                          for ref in suite.references]
        ref_columns = ["reference", "source"] + list(dict.fromkeys(m for ref in suite.references for m in ref.metrics))
        text += "\nPublished figures on the same protocol (×100), for orientation:\n\n" + \
            markdown_table(reference_rows, ref_columns)
    return text


def write_results(suite: Suite, records: list[RunRecord], out_dir: str | Path) -> dict[str, Path]:
    """results.md, summary.csv, runs.csv and plots under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarize(suite, records)
    paths = {"markdown": out_dir / "results.md", "summary_csv": out_dir / "summary.csv",
             "runs_csv": out_dir / "runs.csv"}
    paths["markdown"].write_text(f"# {suite.title or suite.name}\n\n{suite.description}\n\n"
                                 + markdown_summary(suite, summaries))
    _write_summary_csv(suite, summaries, paths["summary_csv"])
    _write_runs_csv(records, paths["runs_csv"])
    paths.update(plot_results(suite, summaries, out_dir))
    return paths


def _write_summary_csv(suite: Suite, summaries: list[ModelSummary], path: Path) -> None:
    metrics = sorted({m for s in summaries for r in s.runs for m in r.metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "group", "runs", *[f"{m} {part}" for m in metrics for part in ("mean", "std")],
                         "train_seconds_per_epoch", "fit_seconds", "eval_seconds_per_10k", "peak_rss_mb",
                         "parameters", "time_to_quality_seconds"])
        for summary in summaries:
            stats = []
            for metric in metrics:
                stat = summary.stat(summary.values(metric))
                stats += [f"{stat[0]:.6f}", f"{stat[1]:.6f}"] if stat else ["", ""]
            ttq = ""
            if suite.quality is not None:
                reached = [r.time_to_quality(suite.quality.metric, suite.quality.value)[0] for r in summary.runs]
                reached = [t for t in reached if t is not None]
                ttq = f"{statistics.fmean(reached):.3f}" if reached else ""
            writer.writerow([summary.label, summary.group, summary.n, *stats,
                             _csv_number(summary.mean_of("epoch_seconds")), _csv_number(summary.mean_of("fit_seconds")),
                             _csv_number(summary.mean_of("eval_seconds_per_10k")),
                             _csv_number(summary.mean_of("peak_rss_mb")), _csv_number(summary.mean_of("parameters")),
                             ttq])


def _write_runs_csv(records: list[RunRecord], path: Path) -> None:
    metrics = sorted({m for r in records for m in r.metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "seed", "status", *metrics, "epochs", "best_epoch", "epoch_seconds",
                         "fit_seconds", "train_seconds", "eval_seconds", "n_cases", "peak_rss_mb", "parameters",
                         "wall_seconds", "cpu_seconds", "error"])
        for r in records:
            writer.writerow([r.label, r.seed, r.status, *[_csv_number(r.metrics.get(m)) for m in metrics],
                             r.epochs, r.best_epoch, _csv_number(r.epoch_seconds), _csv_number(r.fit_seconds),
                             f"{r.train_seconds:.3f}", f"{r.eval_seconds:.3f}", r.n_cases, f"{r.peak_rss_mb:.1f}",
                             r.parameters, f"{r.wall_seconds:.1f}", f"{r.cpu_seconds:.1f}", r.error or ""])


def _csv_number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def plot_results(suite: Suite, summaries: list[ModelSummary], out_dir: Path) -> dict[str, Path]:
    """metrics.png: the suite's metrics per model with ±std bars; quality.png: validation metric
    against cumulative training time for every trainable run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    done = [s for s in summaries if s.runs]
    if done and suite.metrics:
        fig, axes = plt.subplots(1, len(suite.metrics), figsize=(4.2 * len(suite.metrics), 0.35 * len(done) + 1.6),
                                 squeeze=False)
        for axis, metric in zip(axes[0], suite.metrics):
            stats = [s.stat(s.values(metric)) for s in done]
            means = [stat[0] * 100 if stat else 0.0 for stat in stats]
            errors = [stat[1] * 100 if stat else 0.0 for stat in stats]
            axis.barh(range(len(done)), means, xerr=errors, color=[_group_colour(s.group) for s in done], capsize=2)
            axis.set_yticks(range(len(done)), [s.label for s in done], fontsize=8)
            axis.invert_yaxis()
            axis.set_xlabel(f"{metric} (×100)")
            axis.grid(axis="x", alpha=0.3)
        fig.suptitle(suite.title or suite.name, fontsize=10)
        fig.tight_layout()
        paths["metrics_plot"] = out_dir / "metrics.png"
        fig.savefig(paths["metrics_plot"], dpi=110)
        plt.close(fig)
    if suite.quality is not None and any(r.history for s in done for r in s.runs):
        fig, axis = plt.subplots(figsize=(6.5, 4))
        for index, summary in enumerate(s for s in done if any(r.history for r in s.runs)):
            colour = f"C{index % 10}"
            for number, run in enumerate(summary.runs):
                elapsed, values = 0.0, []
                for record in run.history:
                    elapsed += float(record.get("epoch_seconds", 0.0))
                    value = record.get(f"valid_{suite.quality.metric}")
                    if value is not None:
                        values.append((elapsed, value * 100))
                if values:
                    axis.plot(*zip(*values), marker="o", markersize=3, color=colour, alpha=0.8,
                              label=summary.label if number == 0 else None)
        axis.axhline(suite.quality.value * 100, color="grey", linestyle="--", linewidth=1,
                     label=f"target {suite.quality.value * 100:g}")
        axis.set_xlabel("training seconds (validation excluded)")
        axis.set_ylabel(f"validation {suite.quality.metric} (×100)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        fig.tight_layout()
        paths["quality_plot"] = out_dir / "time_to_quality.png"
        fig.savefig(paths["quality_plot"], dpi=110)
        plt.close(fig)
    return paths


def _group_colour(group: str) -> str:
    return {"baseline": "#8c8c8c", "hiersrec": "#1f77b4", "ablation": "#9ecae1"}.get(group, "#8c8c8c")
