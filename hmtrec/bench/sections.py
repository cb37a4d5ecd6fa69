"""The benchmark sections of docs/benchmarks.md, written only through `report.update_section`.

Plots are copied next to the report (docs/img/) so the committed page shows them; the results
folders themselves (bench-results/) are not committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hmtrec.bench.report import DEFAULT_REPORT, markdown_table, update_section
from hmtrec.bench.results import ModelSummary, format_stat, markdown_summary, summarize
from hmtrec.bench.runner import RunRecord
from hmtrec.bench.suites import Suite

COMPARED = ("sasrec", "gru4rec")   # the closing note compares HierSRec with these


def _copy_plot(path: Path | None, name: str, report: Path) -> str:
    if path is None or not Path(path).exists():
        return ""
    target = report.parent / "img" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return f"![{name}](img/{name})\n"


def settings_text(suite: Suite, records: list[RunRecord]) -> str:
    config = suite.config
    data, train, evaluation = config.get("data", {}), config.get("train", {}), config.get("eval", {})
    done = [r for r in records if r.status == "done"]
    cases = sorted({r.n_cases for r in done})
    train_targets = sorted({r.train_targets for r in done})
    lines = [f"- data: `{json.dumps(data, sort_keys=True)}`",
             f"- train (every neural model; per-model overrides in configs/bench/{suite.name}.yaml): "
             f"`{json.dumps(train, sort_keys=True)}`",
             f"- eval: `{json.dumps(evaluation, sort_keys=True)}`",
             f"- test cases: {', '.join(f'{c:,}' for c in cases) or '—'}; training targets: "
             f"{', '.join(f'{t:,}' for t in train_targets) or '—'}",
             f"- seeds: {sorted({r.seed for r in done}) or suite.seeds} (models marked deterministic ran once: "
             "every seed gives the same result)",
             "- metrics ×100 as mean ± sample std over seeds; `cand.` = candidate mode (only leaves under the "
             "top nodes of the coarse level are ranked); train s/epoch excludes validation; eval s/10k cases "
             "is the full test evaluation (full and candidate mode) per 10,000 cases; peak RSS is the whole "
             "run's process (data included); run CPU/wall s is that process's CPU time against its wall time: "
             "on a shared machine wall-clock timings (s/epoch, s/10k cases) stretch by wall/CPU"]
    if suite.quality is not None:
        lines.append(f"- time to quality: training seconds until validation {suite.quality.metric} first "
                     f"reaches {suite.quality.value:g} (checked once per epoch)")
    return "\n".join(lines) + "\n"


def _difference(ours: ModelSummary, theirs: ModelSummary, metric: str) -> tuple[float, str] | None:
    """(ours - theirs in points, a phrase) for one metric, means over seeds; None without values."""
    mine, other = ours.stat(ours.values(metric)), theirs.stat(theirs.values(metric))
    if mine is None or other is None:
        return None
    difference = (mine[0] - other[0]) * 100
    relative = (mine[0] / other[0] - 1) * 100 if other[0] else float("inf")
    # separated by more than twice the larger seed-to-seed std: a difference the seeds do not explain
    clear = abs(difference) > 2 * max(mine[1], other[1]) * 100
    single = ours.n < 2 or theirs.n < 2
    note = ", one seed" if single else "" if clear else ", within seed noise"
    return difference, (f"{metric} {mine[0] * 100:.2f} vs {other[0] * 100:.2f} "
                        f"({difference:+.2f} points, {relative:+.1f}%{note})")


def verdict(suite: Suite, summaries: list[ModelSummary], metrics: list[str] | None = None) -> str:
    """One sentence per compared model: does HierSRec beat it, and by how much (mean over seeds)."""
    metrics = metrics or suite.metrics[:2]
    by_label = {s.label: s for s in summaries}
    main = by_label.get("hiersrec")
    if main is None or not main.runs:
        return "HierSRec has no finished run in this suite.\n"
    lines = []
    for other_label in COMPARED:
        other = by_label.get(other_label)
        if other is None or not other.runs:
            lines.append(f"- {other_label}: no finished run to compare with.")
            continue
        compared = [c for c in (_difference(main, other, metric) for metric in metrics) if c is not None]
        wins = sum(difference > 0 for difference, _ in compared)
        outcome = "beats" if wins == len(compared) and compared else "does not beat" if wins == 0 else "is mixed against"
        lines.append(f"- HierSRec {outcome} {other_label}: " + "; ".join(phrase for _, phrase in compared))
    return "\n".join(lines) + "\n"


def ablation_effects(suite: Suite, summaries: list[ModelSummary], metrics: list[str] | None = None) -> str:
    """Each ablation against full HierSRec: what switching that part off (or reweighting it) costs."""
    metrics = metrics or suite.metrics[:2]
    by_label = {s.label: s for s in summaries}
    main = by_label.get("hiersrec")
    ablations = [s for s in summaries if s.group == "ablation" and s.runs]
    if main is None or not main.runs or not ablations:
        return ""
    lines = []
    for ablation in ablations:
        compared = [c for c in (_difference(ablation, main, metric) for metric in metrics) if c is not None]
        lines.append(f"- {ablation.label} vs hiersrec: " + "; ".join(phrase for _, phrase in compared))
    return "\n**Ablations against full HierSRec** (negative = the ablated part helps):\n\n" + "\n".join(lines) + "\n"


def final_fit_effects(suite: Suite, summaries: list[ModelSummary], metrics: list[str] | None = None) -> str:
    """With `train.final_fit`: each model's test figures against its own selection model's (the
    same run before the final fit on train + valid): what training on the validation tail too adds."""
    metrics = metrics or suite.metrics[:2]
    rows = []
    for summary in summaries:
        runs = [r for r in summary.runs if r.selection_metrics]
        if not runs:
            continue
        row = {"model": summary.label, "runs": str(len(runs)),
               "epochs (final fit)": "/".join(str(r.best_epoch) for r in runs)}
        for metric in metrics:
            final = [r.metrics[metric] for r in runs if metric in r.metrics and metric in r.selection_metrics]
            selection = [r.selection_metrics[metric] for r in runs if metric in r.metrics and metric in r.selection_metrics]
            gain = [a - b for a, b in zip(final, selection)]
            row[f"{metric} final fit"] = format_stat(summary.stat(final), len(final))
            row[f"{metric} selection model"] = format_stat(summary.stat(selection), len(selection))
            row[f"{metric} gain"] = format_stat(summary.stat(gain), len(gain))
        rows.append(row)
    if not rows:
        return ""
    return ("\n**Final fit against the selection model** (test; the selection model trains on the training "
            "split alone and chooses the epoch on valid; the final fit trains afresh on train + valid for that "
            "many epochs: the table's figures):\n\n" + markdown_table(rows) + "\n")


def frequency_breakdown(suite: Suite, summaries: list[ModelSummary], metrics: list[str] | None = None) -> str:
    """Test metrics by the target item's training frequency (mean ± std over seeds), one row per model
    whose runs recorded the breakdown: where a model's accuracy comes from (rare, unseen, popular items)."""
    metrics = metrics or suite.metrics[:2]
    with_breakdown = [s for s in summaries if any(r.frequency_metrics for r in s.runs)]
    if not with_breakdown:
        return ""
    buckets: list[str] = []
    counts: dict[str, int] = {}
    for summary in with_breakdown:
        for run in summary.runs:
            for bucket, count in run.frequency_cases.items():
                if bucket not in buckets:
                    buckets.append(bucket)
                counts.setdefault(bucket, count)
    rows = []
    for summary in with_breakdown:
        row = {"model": summary.label}
        for bucket in buckets:
            for metric in metrics:
                values = [r.frequency_metrics[bucket][metric] for r in summary.runs
                          if metric in r.frequency_metrics.get(bucket, {})]
                row[f"{bucket} {metric}"] = format_stat(summary.stat(values), summary.n)
        rows.append(row)
    shares = ", ".join(f"{bucket} {counts[bucket]:,}" for bucket in buckets)
    return ("\n**By the target item's training frequency** (occurrences in the data the model learnt from: the "
            "training split, train + valid after a final fit; test cases: "
            f"{shares}):\n\n" + markdown_table(rows) + "\n")


def report_suite(suite: Suite, records: list[RunRecord], plots: dict[str, Path], *, command: str,
                 updated_by: str | None = None, report: Path | None = None) -> Path:
    """`command` regenerates the whole table (every model and seed of the suite, reusing finished
    runs); `updated_by`, when different, is the narrower invocation that wrote this update."""
    report = Path(report) if report is not None else DEFAULT_REPORT
    summaries = summarize(suite, records)
    body = f"*Last updated by:* `{updated_by}`\n\n" if updated_by and updated_by != command else ""
    body += (f"{suite.description.strip()}\n\n" if suite.description else "") + settings_text(suite, records) + "\n"
    body += markdown_summary(suite, summaries) + "\n"
    body += _copy_plot(plots.get("metrics_plot"), f"bench-{suite.name}-metrics.png", report)
    body += _copy_plot(plots.get("quality_plot"), f"bench-{suite.name}-time-to-quality.png", report)
    failed = [r for r in records if r.status != "done"]
    if failed:
        body += "\nRuns that did not finish: " + "; ".join(f"{r.label} seed {r.seed} ({r.error})" for r in failed) + "\n"
    body += final_fit_effects(suite, summaries)
    body += frequency_breakdown(suite, summaries)
    body += "\n**HierSRec against the single-task baselines:**\n\n" + verdict(suite, summaries)
    body += ablation_effects(suite, summaries)
    return update_section(f"bench-{suite.name}", body, title=suite.title or suite.name, command=command, path=report)


def report_sweep(rows_by_model: dict[str, list[dict]], plot: Path | None, *, description: str, command: str,
                 report: Path | None = None) -> Path:
    report = Path(report) if report is not None else DEFAULT_REPORT
    body = description.strip() + "\n\n"
    for label, rows in rows_by_model.items():
        body += f"**{label}**\n\n" + markdown_table(rows) + "\n"
    body += _copy_plot(plot, "bench-candidate-sweep.png", report)
    return update_section("bench-candidate-sweep", body, title="Candidate-size sweep", command=command, path=report)


def report_speed(scoring: list[dict], training: list[dict], *, description: str, command: str,
                 report: Path | None = None) -> Path:
    report = Path(report) if report is not None else DEFAULT_REPORT
    body = description.strip() + "\n\n**Full-catalogue vs candidate scoring**\n\n" + markdown_table(scoring)
    body += "\n**Training step throughput and achieved FLOP rate**\n\n" + markdown_table(training)
    return update_section("bench-speed", body, title="Speed and scale", command=command, path=report)


def report_conclusion(suites: list[tuple[Suite, list[RunRecord]]], *, command: str,
                      report: Path | None = None) -> Path:
    """The closing note: per dataset, whether HierSRec beats SASRec and GRU4Rec, and by how much."""
    report = Path(report) if report is not None else DEFAULT_REPORT
    body = ("Means over seeds on each suite's first two metrics (test set, full catalogue). A difference is "
            "called within seed noise when it is smaller than twice the larger of the two seed-to-seed "
            "standard deviations.\n\n")
    for suite, records in suites:
        body += f"**{suite.title or suite.name}**\n\n" + verdict(suite, summarize(suite, records)) + "\n"
    return update_section("bench-conclusion", body, title="Closing note: HierSRec against SASRec and GRU4Rec",
                          command=command, path=report)


