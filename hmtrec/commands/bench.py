"""`hmtrec bench ...`: benchmark suites, the candidate-size sweep and the speed figures.

    hmtrec bench list
    hmtrec bench run diginetica movielens-1m --seeds 0,1,2 --out bench-results --report
    hmtrec bench run my_config.yaml --models hiersrec,sasrec
    hmtrec bench candidates bench-results/diginetica/runs/hiersrec/seed0 --level category --report
    hmtrec bench speed --items 1000000 --report
    hmtrec bench conclude --out bench-results --report

`run` writes, per suite, <out>/<suite>/{results.md, summary.csv, runs.csv, metrics.png,
time_to_quality.png, records.json} and one run directory per (model, seed); finished runs are
reused, so rerunning a suite only runs what is missing. `--report` also rewrites the suite's
section of docs/benchmarks.md (and nothing else in it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from hmtrec.errors import ConfigError


def _command_line() -> str:
    return "hmtrec " + " ".join(sys.argv[1:])


def _whole_suite_command(suite_argument: str, out: Path, overrides: list[str] | None) -> str:
    """The command that regenerates a suite's whole table: every model and seed, finished runs reused."""
    parts = ["hmtrec", "bench", "run", suite_argument]
    if out != Path("bench-results"):
        parts += ["--out", str(out)]
    for item in overrides or []:
        parts += ["--set", item]
    return " ".join(parts + ["--report"])


def _int_list(text: Optional[str], option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{option}: expected integers separated by commas, got {text!r}") from None


def _overrides(items: list[str] | None) -> dict:
    from hmtrec.bench.suites import deep_merge
    from hmtrec.config import _set_dotted, parse_overrides

    tree: dict = {}
    for key, value in parse_overrides(items):
        _set_dotted(tree, key, value)
    return deep_merge({}, tree)


def register(app: typer.Typer) -> None:
    bench = typer.Typer(no_args_is_help=True, help="Benchmarks: suites of models and seeds, candidate sweep, speed.")
    app.add_typer(bench, name="bench")

    @bench.command("list")
    def list_suites():
        """The built-in suites (configs/bench/*.yaml) and their models."""
        from hmtrec.bench.suites import builtin_suites, load_suite
        from hmtrec.progress import console

        for name in builtin_suites():
            suite = load_suite(name)
            console.print(f"[bold]{name}[/bold]: {suite.title or ''} — seeds {suite.seeds}")
            console.print("  " + ", ".join(model.label for model in suite.models))

    @bench.command("run")
    def run(
        suites: List[str] = typer.Argument(..., help="Built-in suite names, suite YAML files, or sequence configs."),
        out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Results root folder."),
        models: Optional[str] = typer.Option(None, "--models", "-m", help="Only these model labels (comma-separated)."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds, e.g. 0,1,2 (default: the suite's)."),
        threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads per run (1 avoids oversubscription)."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                      help="Override a config key of every run: a.b=value."),
        force: bool = typer.Option(False, "--force", help="Rerun finished runs instead of reusing them."),
        report: bool = typer.Option(False, "--report", help="Rewrite the suites' sections of docs/benchmarks.md."),
    ):
        """Run suites over their models and seeds; write tables, CSVs and plots."""
        from hmtrec.bench.results import write_results
        from hmtrec.bench.runner import collect_finished, records_to_json, run_suite
        from hmtrec.bench.sections import report_suite
        from hmtrec.bench.suites import load_suite
        from hmtrec.progress import console

        labels = [label.strip() for label in models.split(",")] if models else None
        loaded = [load_suite(name) for name in suites]          # every suite validated before any run
        for argument, suite in zip(suites, loaded):
            suite_dir = out / suite.name
            run_suite(suite, suite_dir, labels=labels, seeds=_int_list(seeds, "--seeds"),
                      threads=threads, overrides=_overrides(overrides), force=force)
            # tables cover every finished run of the suite, not only this invocation's
            records = collect_finished(suite, suite_dir, threads=threads, overrides=_overrides(overrides))
            (suite_dir / "records.json").write_text(json.dumps(records_to_json(records), indent=1))
            paths = write_results(suite, records, suite_dir)
            console.print(paths["markdown"].read_text())
            console.print(f"results: {suite_dir}")
            if report:
                written = report_suite(suite, records, paths, updated_by=_command_line(),
                                       command=_whole_suite_command(argument, out, overrides))
                console.print(f"updated {written}")

    @bench.command("candidates")
    def candidates(
        run_dirs: List[Path] = typer.Argument(..., help="Run directories of trained sequence models."),
        level: Optional[str] = typer.Option(None, "--level", help="Candidate level (default: the one above leaves)."),
        cutoff: int = typer.Option(20, "--cutoff", min=1, help="K of Recall@K and MRR@K."),
        out: Path = typer.Option(Path("bench-results/candidate-sweep"), "--out", "-o"),
        threads: int = typer.Option(1, "--threads", min=1),
        report: bool = typer.Option(False, "--report", help="Rewrite the sweep's section of docs/benchmarks.md."),
    ):
        """Sweep the number of candidate nodes from 1 to all: candidate fraction against Recall, MRR, coverage."""
        import torch

        from hmtrec.bench.candidate_sweep import candidate_sweep, plot_sweeps
        from hmtrec.bench.report import markdown_table
        from hmtrec.bench.sections import report_sweep
        from hmtrec.data.loading import load_data
        from hmtrec.progress import console
        from hmtrec.serve.artefact import load_sequence_run

        torch.set_num_threads(threads)
        out.mkdir(parents=True, exist_ok=True)
        sweeps, rows, descriptions = {}, {}, []
        for run_dir in run_dirs:
            artefact = load_sequence_run(run_dir)
            final_fit = artefact.config.train.final_fit
            prepared = load_data(artefact.config.data, with_train_all=final_fit)
            artefact.check_catalogue(prepared.taxonomy)
            artefact.fit_missing(prepared.fitting_split(final_fit))
            label = f"{artefact.main} ({run_dir})"
            chosen = level or prepared.taxonomy.level_names[-2]
            sweep = candidate_sweep(artefact.model(), prepared.test, prepared.taxonomy, chosen,
                                    max_len=artefact.config.eval_max_len, cutoff=cutoff)
            sweeps[label], rows[label] = sweep, sweep.rows()
            descriptions.append(f"{label}: {prepared.dataset.name}, {sweep.n_cases:,} test cases, "
                                f"{prepared.taxonomy.n_nodes(chosen):,} {chosen} nodes over "
                                f"{prepared.taxonomy.n_leaves:,} leaves")
            console.print(f"[bold]{label}[/bold]\n" + markdown_table(rows[label]))
            with open(out / f"{artefact.main}-{Path(run_dir).name}.csv", "w") as f:
                f.write("k,fraction,coverage,recall,mrr\n")
                for k, fr, co, re, mr in zip(sweep.ks, sweep.fraction, sweep.coverage, sweep.recall, sweep.mrr):
                    f.write(f"{k},{fr:.6f},{co:.6f},{re:.6f},{mr:.6f}\n")
        plot = out / "candidate_sweep.png"
        plot_sweeps(sweeps, plot, title="candidate fraction against quality")
        console.print(f"results: {out}")
        if report:
            description = ("Fixed-k candidate mode for every k from 1 to all nodes of the candidate level, from one "
                           "scoring pass (hmtrec/bench/candidate_sweep.py); the table shows selected k. Metrics ×100 "
                           "at the leaf level; coverage = share of test targets inside the candidates.\n\n- "
                           + "\n- ".join(descriptions))
            console.print(f"updated {report_sweep(rows, plot, description=description, command=_command_line())}")

    @bench.command("speed")
    def speed(
        items: int = typer.Option(1_000_000, "--items", min=2, help="Leaves of the synthetic scoring catalogue."),
        nodes: int = typer.Option(1000, "--nodes", min=1, help="Coarse nodes above them."),
        dim: int = typer.Option(64, "--dim", min=1),
        batch: int = typer.Option(256, "--batch", min=1, help="Queries per batch for throughput."),
        fractions: str = typer.Option("0.01,0.05", "--fractions", help="Candidate fractions to time."),
        models: str = typer.Option("sasrec,gru4rec,hiersrec", "--models", help="Models whose training step is timed."),
        threads: int = typer.Option(1, "--threads", min=1),
        report: bool = typer.Option(False, "--report", help="Rewrite the speed section of docs/benchmarks.md."),
    ):
        """Full vs candidate scoring latency/throughput on a large catalogue; training throughput and GFLOP/s."""
        import torch

        from hmtrec.bench.report import markdown_table
        from hmtrec.bench.sections import report_speed
        from hmtrec.bench.speed import scoring_benchmark, scoring_rows, training_benchmark, training_rows
        from hmtrec.progress import console

        torch.set_num_threads(threads)
        try:
            chosen_fractions = tuple(float(f) for f in fractions.split(","))
        except ValueError:
            raise ConfigError(f"--fractions: expected numbers separated by commas, got {fractions!r}") from None
        console.print(f"[bold]scoring[/bold]: {items:,} leaves under {nodes:,} nodes, dim {dim}")
        scoring, _ = scoring_benchmark(items, nodes, dim, fractions=chosen_fractions, batch=batch)
        scoring_table = scoring_rows(scoring)
        console.print(markdown_table(scoring_table))
        console.print("[bold]training steps[/bold]")
        training = training_benchmark([{"name": name.strip()} for name in models.split(",") if name.strip()])
        training_table = training_rows(training)
        console.print(markdown_table(training_table))
        if report:
            description = (
                f"Scoring: {items:,} synthetic leaves (dim {dim}) under {nodes:,} coarse nodes of Zipf-like sizes; "
                f"exact top-20 by dot product over every leaf (`serve.candidates.full_topk`, chunked) against "
                f"top nodes by dot product followed by top-20 over their leaves only (`NodeBlocks.topk`: the leaves regrouped once into contiguous per-node blocks); latency is "
                f"the median of single-query calls, throughput uses batches of {batch}. Training: one step "
                f"(forward, backward, AdamW) of each model with default parameters on 128 windows of 20 events "
                f"over a 43,097-item catalogue (Diginetica's size); FLOPs counted by torch's FlopCounterMode "
                f"(matrix multiplies and attention, forward and backward; element-wise work not counted), "
                f"compared with a 1024×1024 float32 matrix multiply timed in the same process (GRU4Rec's step here "
                f"runs on the same windows, not session-parallel). {threads} thread{'s' if threads > 1 else ''}; "
                f"the machine is shared, so absolute figures vary between runs while ratios are more stable.")
            console.print(f"updated {report_speed(scoring_table, training_table, description=description, command=_command_line())}")

    @bench.command("conclude")
    def conclude(
        suites: List[str] = typer.Argument(..., help="Suites whose results to compare (names or files)."),
        out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Results root folder."),
        report: bool = typer.Option(False, "--report", help="Rewrite the closing note of docs/benchmarks.md."),
    ):
        """The closing note from finished suites: does HierSRec beat SASRec and GRU4Rec, and by how much."""
        from hmtrec.bench.results import summarize
        from hmtrec.bench.runner import RunRecord
        from hmtrec.bench.sections import report_conclusion, verdict
        from hmtrec.bench.suites import load_suite
        from hmtrec.progress import console

        finished = []
        for name in suites:
            suite = load_suite(name)
            path = out / suite.name / "records.json"
            if not path.exists():
                raise ConfigError(f"no results for suite {suite.name!r} in {path.parent}; run `hmtrec bench run {name}` first")
            records = [RunRecord(**record) for record in json.loads(path.read_text())]
            finished.append((suite, records))
            console.print(f"[bold]{suite.title or suite.name}[/bold]\n" + verdict(suite, summarize(suite, records)))
        if report:
            console.print(f"updated {report_conclusion(finished, command=_command_line())}")
