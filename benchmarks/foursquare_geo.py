"""Next-destination prediction on Foursquare NYC at region and cell level (issues 5 and 14).

    python benchmarks/foursquare_geo.py                      # 3 seeds + ablations, ~1 hour wall on 2 busy cores
    python benchmarks/foursquare_geo.py --quick              # a smoke run, not written to docs/benchmarks.md
    python benchmarks/foursquare_geo.py --seeds 0 --no-ablations --set train.epochs=2

Trains configs/geo/foursquare-nyc.yaml through the geo pipeline (exactly what `hmtrec train`
does) and rewrites the "foursquare-geo" section of docs/benchmarks.md:
- multi-level (region and cell heads, consistency term) and single-level (a cell head only,
  regions summed from cells), each over `--seeds` (train.seed and examples.seed), mean ± std;
- one ablation row per switch of the model (seed 0): each signal turned off alone;
plus the non-neural reference geo-history-pop (the user's recency-weighted visits plus
popularity) on the same test examples. Tables: Acc@1, Acc@5 and MRR at region and cell level,
overall, for active and dormant examples and by the target cell's training check-ins; the
hierarchy-violation rate; validation cell MRR (what settings were chosen on); training time.

Runs go to bench-results/foursquare-geo/<variant>-seed<k>/; a run whose metrics.json exists and
whose config.yaml equals the resolved config, but for the keys fitted after training, is reused, so
an interrupted benchmark resumes. The post-training variants (`POST`: the reference blend, the
region conditioning, the activity buckets) are fitted on each main run's trained weights by
`hmtrec refit` into <run>--<post variant>/ (no retraining) and reported variant by variant; the
main tables show the variant the config itself describes.
`--jobs 2` trains two runs at once, one torch thread each (both cores).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hmtrec.bench.report import markdown_table, update_section  # noqa: E402
from hmtrec.config import load_config  # noqa: E402
from hmtrec.models.registry import validate_model_params  # noqa: E402
from hmtrec.rundir import SELECTION_DIR as SELECTION, read_json  # noqa: E402

CONFIG = REPO / "configs" / "geo" / "foursquare-nyc.yaml"
# the single-level model has no coarser head to factorise its cells through
MAIN = {"multi-level": [], "single-level (cell)": ["model.levels=[cell]", "model.factorized_weight=0.0"]}
# train.final_fit: the main run's network chooses the epochs and the post-training stage on
# validation, then a fresh one trains on train + valid for those epochs and is tested
FINAL_FIT = ["train.final_fit=true"]
ABLATIONS = {
    "all switches on": [],
    "no copy pointer": ["model.copy_history=false"],
    "no recency bias on the pointer": ["model.copy_recency=false"],
    "no hour/weekday in tokens": ["model.token_time=false"],
    "no user embedding": ["model.user_buckets=0"],
    "no distance bias": ["model.distance_bias=false"],
    "no consistency term": ["model.consistency_weight=0.0"],
    "plus history counts (log-linear pointer)": ["model.history_counts=true"],
    "plus baseline prior (log-prior, learned scale)": ["model.baseline_prior=true"],
    "plus baseline mix (third mixture component)": ["model.baseline_mix=true"],
    "plus factorised cells (λ 1)": ["model.factorized_weight=1.0"],
    "plus factorised cells (λ 0.5)": ["model.factorized_weight=0.5"],
    "consistency weight 3": ["model.consistency_weight=3.0"],
    "region loss weight 0.5": ["model.loss_weights={region: 0.5}"],
}
# The switches issue 14 added, on the main runs' own protocol (every training target, the same
# epochs and early stopping, seed 0), each flipped alone from the earlier defaults (constant lr, no
# reference blend): the one-epoch sample above is too short to separate them. Compared by
# validation at the best epoch; test not reported.
FULL_ABLATIONS = {
    "plus baseline prior": ["model.baseline_prior=true"],
    "plus baseline mix": ["model.baseline_mix=true"],
    "plus factorised cells (λ 1)": ["model.factorized_weight=1.0"],
    "plus cosine lr (warm-up 5%)": ["train.lr_schedule=cosine", "train.warmup_fraction=0.05"],
    "plus cosine lr and baseline mix": ["train.lr_schedule=cosine", "train.warmup_fraction=0.05",
                                        "model.baseline_mix=true"],
}
# the earlier defaults the ablations above (and below) flip switches from: no lr schedule, no
# blend with the reference (the blend is fitted after training; its own table compares it)
EARLIER = ["train.lr_schedule=constant", "train.warmup_fraction=0.0", "model.reference_blend=false"]
FULL_ABLATION_RUN = ["baselines=[]", "eval.max_targets=200"]
# Ablations (each switch flipped alone from the config) are compared on validation after one epoch
# on a sample of training targets, which is what the defaults were chosen on; their test
# evaluation is a small sample and is not reported.
ABLATION_TARGETS = 30000
# the ablations start from every switch on (the config turns off those that did not help)
ALL_ON = ["model.copy_history=true", "model.copy_recency=true", "model.token_time=true", "model.user_buckets=2048",
          "model.distance_bias=true", "model.consistency_weight=1.0"]
ABLATION_RUN = ["train.epochs=1", f"examples.max_targets={ABLATION_TARGETS}", "baselines=[]", "eval.max_targets=200"]
# The post-training stage, fitted by `hmtrec refit` on each main run's trained weights (no
# retraining): the blend alone (what the main runs were trained with), and the blend with the
# region conditioning (the cell weight and α chosen together, regions tied to the cells), with the
# recent-activity buckets none / some and none / 1-5 / 6+ check-ins in the last week.
POST = {
    "blend": ["model.reference_blend=true", "model.region_conditioning=false", "model.tied_regions=false",
              "model.blend_count_edges=[1]"],
    "blend + conditioning": ["model.reference_blend=true", "model.region_conditioning=true",
                             "model.tied_regions=true", "model.blend_count_edges=[1]"],
    "blend + conditioning, 3 buckets": ["model.reference_blend=true", "model.region_conditioning=true",
                                        "model.tied_regions=true", "model.blend_count_edges=[1,6]"],
    "blend + conditioning, 3 buckets x last repeat": [
        "model.reference_blend=true", "model.region_conditioning=true", "model.tied_regions=true",
        "model.blend_count_edges=[1,6]", "model.blend_last_repeat=true"],
}
POST_BUCKETS = {"blend + conditioning": "none / some",
                "blend + conditioning, 3 buckets": "none / 1-5 / 6+",
                "blend + conditioning, 3 buckets x last repeat": "none / 1-5 / 6+, x last repeat"}
BASELINE = "geo-history-pop"
VIEWS = {"alone": "model alone", "cross_fitted": "served stage, cross-fitted (settings from the other half of the users)",
         "fitted": "served stage, settings fitted on all of validation (in-sample)"}
QUICK = ["data.max_sequences=150", "examples.max_targets=1000", "train.epochs=1", "train.valid_max_targets=300",
         "eval.max_targets=500"]
SWITCHES = ("copy_history", "copy_recency", "history_counts", "token_time", "user_buckets", "distance_bias",
            "baseline_prior", "baseline_mix", "factorized_weight")
LEVELS = ("region", "cell")
METRICS = ("Acc@1", "Acc@5", "MRR")
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def resolved(config) -> dict:
    """The config as a plain tree, model parameters resolved (spelling out a default is the same run)."""
    tree = config.model_dump(mode="json")
    entry, params = validate_model_params("sequence", config.model)
    tree["model"] = {"name": config.model["name"], **params.model_dump(mode="json")}
    return tree


def trained_identity(config) -> dict:
    """The resolved config without the keys fitted after training: two configs with the same
    identity describe the same trained network (`hmtrec refit` moves between them)."""
    tree = resolved(config)
    for key in config.refit_keys():
        tree["model"].pop(key.split(".", 1)[1], None)
    return tree


def cli(command: list[str], log_name: str, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (out / log_name).open("w") as log:
        subprocess.run([sys.executable, "-m", "hmtrec.cli", *command], check=True, stdout=log,
                       stderr=subprocess.STDOUT, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def refit_one(name: str, source: Path, overrides: list[str], post: list[str], out: Path, refit: bool = True
              ) -> dict | None:
    """The post-training variant `post` of a trained run: the run itself when its config already is
    that variant, else a refit of its trained weights into <source>--<variant> (`hmtrec refit`,
    reused when finished with the same config); its metrics.json (None when missing and `refit` is off)."""
    config = load_config(CONFIG, overrides + post)
    if not (source / "metrics.json").exists():
        return None
    if resolved(load_config(source / "config.yaml")) == resolved(config):
        return read_json(source / "metrics.json")
    target = out / f"{source.name}--{slug(name)}"
    finished = target / "metrics.json"
    if not (finished.exists() and resolved(load_config(target / "config.yaml")) == resolved(config)):
        if not refit:
            print(f"{source.name} {name}: no finished refit, left out", flush=True)
            return None
        keys = config.refit_keys()
        command = ["refit", str(source), "-o", str(target)]
        for item in overrides + post:
            if item.split("=", 1)[0].strip() in keys:
                command += ["--set", item]
        print(f"{source.name} {name}: refitted in {cli(command, f'{target.name}.log', out):.0f} s", flush=True)
    return read_json(finished)


def run_one(name: str, overrides: list[str], out: Path, train: bool = True, selection_from: Path | None = None
            ) -> dict | None:
    """Train one run in its own process (unless a finished run of the same trained network exists:
    its post-training keys may differ, `refit_one` fits them); its metrics.json (None when it is
    missing and `train` is off). A final fit's selection run is the main run of the same settings:
    `selection_from`'s trained checkpoint is copied into <run>/selection/ instead of training it again."""
    run_dir = out / slug(name)
    config = load_config(CONFIG, overrides)
    finished = run_dir / "metrics.json"
    if not (finished.exists() and trained_identity(load_config(run_dir / "config.yaml")) == trained_identity(config)):
        if not train:
            print(f"{name}: no finished run, left out", flush=True)
            return None
        # an interrupted run of this very config resumes from its checkpoints; any other is removed
        if (run_dir / "config.yaml").exists() and resolved(load_config(run_dir / "config.yaml")) != resolved(config):
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        if selection_from is not None and (selection_from / "checkpoint.pt").exists() \
                and not (run_dir / SELECTION / "checkpoint.pt").exists():
            (run_dir / SELECTION).mkdir(parents=True, exist_ok=True)
            for file in ("checkpoint.pt", "best.safetensors"):
                shutil.copy2(selection_from / file, run_dir / SELECTION / file)
        command = [sys.executable, "-m", "hmtrec.cli", "train", "-c", str(CONFIG), "-o", str(run_dir)]
        for item in overrides:
            command += ["--set", item]
        out.mkdir(parents=True, exist_ok=True)
        log = (out / f"{slug(name)}.log").open("w")
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return read_json(finished)


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def cell_text(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def metric_row(label: str, per_seed: list[dict], **extra) -> dict:
    """per_seed: [{level: {metric: value}}] -> one table row of mean ± std."""
    row = {"model": label, **extra}
    for level in LEVELS:
        for metric in METRICS:
            row[f"{level} {metric}"] = cell_text([r[level][metric] for r in per_seed])
    return row


def schedule_text(train) -> str:
    if train.lr_schedule == "constant" and train.warmup_fraction == 0:
        return "constant"
    return (f"linear warm-up over {train.warmup_fraction:.0%} of the steps, then {train.lr_schedule} to "
            f"{train.lr_floor:g} x lr at the last step of epoch {train.epochs}")


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(flag for flag in CPU_FLAGS if flag in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--no-train", action="store_true",
                        help="report the finished runs only (a row's 'seeds' column says how many)")
    parser.add_argument("--no-refit", action="store_true",
                        help="report the finished post-training refits only (no `hmtrec refit`)")
    parser.add_argument("--final-fit", nargs="*", choices=list(MAIN), default=list(MAIN), metavar="MODEL",
                        help="main models that also get a final fit on train + valid (default: both; none: no final fit)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; does not touch docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "foursquare-geo")
    args = parser.parse_args()
    base = (QUICK if args.quick else []) + args.overrides

    jobs: dict[tuple[str, int], list[str]] = {}
    for name, variant in MAIN.items():
        for seed in args.seeds:
            jobs[(name, seed)] = base + variant + [f"train.seed={seed}", f"examples.seed={seed}"]
    if not args.no_ablations:
        for name, variant in ABLATIONS.items():
            jobs[(name, args.seeds[0])] = base + EARLIER + ALL_ON + variant + [f"train.seed={args.seeds[0]}",
                                                            f"examples.seed={args.seeds[0]}"] + ABLATION_RUN
        for name, variant in FULL_ABLATIONS.items():
            jobs[(f"full: {name}", args.seeds[0])] = base + EARLIER + variant + [
                f"train.seed={args.seeds[0]}", f"examples.seed={args.seeds[0]}"] + FULL_ABLATION_RUN
        jobs[("earlier: multi-level", args.seeds[0])] = base + MAIN["multi-level"] + EARLIER + [
            f"train.seed={args.seeds[0]}", f"examples.seed={args.seeds[0]}"]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(run_one, f"{key[0]} seed{key[1]}", overrides, args.out, not args.no_train)
                   for key, overrides in jobs.items()}
        runs = {key: future.result() for key, future in futures.items()}
    runs = {key: metrics for key, metrics in runs.items() if metrics is not None}
    # the post-training variants of every main run, on its trained weights (`hmtrec refit`)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {(name, seed, post): pool.submit(refit_one, post, args.out / slug(f"{name} seed{seed}"),
                                                   jobs[(name, seed)], items, args.out, not args.no_refit)
                   for name in MAIN for seed in args.seeds for post, items in POST.items()}
        post_runs = {key: future.result() for key, future in futures.items()}
    post_runs = {key: metrics for key, metrics in post_runs.items() if metrics is not None}
    default_post = next((post for post, items in POST.items()
                         if resolved(load_config(CONFIG, base + items)) == resolved(load_config(CONFIG, base))), None)
    for (name, seed, post), metrics in post_runs.items():    # the main rows: the config's own variant
        if post == default_post:
            runs[(name, seed)] = metrics
    # the final fits, each from its main run's trained checkpoint (the selection run)
    final_names = {f"{name}, final fit": name for name in args.final_fit}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {(final, seed): pool.submit(run_one, f"{final} seed{seed}", jobs[(name, seed)] + FINAL_FIT, args.out,
                                              not args.no_train, args.out / slug(f"{name} seed{seed}"))
                   for final, name in final_names.items() for seed in args.seeds}
        final_runs = {key: future.result() for key, future in futures.items()}
    final_runs = {key: metrics for key, metrics in final_runs.items() if metrics is not None}
    wall = time.perf_counter() - started
    config = load_config(CONFIG, base)
    main_model = config.model["name"]

    def results(name: str) -> list[dict]:
        return [runs[(name, seed)]["test"][main_model] for seed in args.seeds if (name, seed) in runs]

    reference = runs[("multi-level", args.seeds[0])]["test"][BASELINE]
    groups = {name: results(name) for name in MAIN} | {BASELINE: [reference]}
    overall = [metric_row(name, [r["overall"] for r in rs], seeds=len(rs), examples=rs[0]["n_examples"])
               for name, rs in groups.items()]
    kinds = [metric_row(name, [r["by_kind"][kind] for r in rs], kind=kind, examples=rs[0]["counts"][kind])
             for kind in ("active", "dormant") for name, rs in groups.items()]
    frequency = []
    for bucket in reference["by_frequency"]["buckets"]:
        for name, rs in groups.items():
            values = [r["by_frequency"]["buckets"][bucket] for r in rs]
            frequency.append(metric_row(name, values, **{"cell train check-ins": bucket, "examples": values[0]["n"]}))
    violations = [{"model": name, **{group: cell_text([(r["violation_rate"] if group == "all" else
                                                        r["violation_rate_by_kind"][group])["cell_in_region"]
                                                       for r in rs]) for group in ("all", "active", "dormant")}}
                  for name, rs in groups.items()]
    multi = [r["overall"]["cell"]["MRR"] for r in groups["multi-level"]]
    single = [r["overall"]["cell"]["MRR"] for r in groups["single-level (cell)"]]
    gap, (_, multi_std), (_, single_std) = mean_std(multi)[0] - mean_std(single)[0], mean_std(multi), mean_std(single)

    ablation_rows = []
    seed0 = args.seeds[0]
    for name in ([] if args.no_ablations else ABLATIONS):
        if (name, seed0) not in runs:            # --no-train: an unfinished row is left out
            continue
        first_epoch = runs[(name, seed0)]["history"][0]
        ablation_rows.append({"model": name,
                              **{f"valid {level} {metric}": first_epoch[f"valid_{level}_{metric}"]
                                 for level in LEVELS for metric in METRICS}})
    full_rows = []
    full_runs = {"earlier defaults (constant lr, no blend)": ("earlier: multi-level", seed0),
                 **{name: (f"full: {name}", seed0) for name in FULL_ABLATIONS},
                 "defaults, the model alone (before the blend)": ("multi-level", seed0)}
    for name, key in ({} if args.no_ablations else full_runs).items():
        run = runs.get(key)
        if run is None:
            continue
        best = run["history"][run["best_epoch"] - 1]
        full_rows.append({"model": name, "best epoch": run["best_epoch"],
                          **{f"valid {level} {metric}": best[f"valid_{level}_{metric}"]
                             for level in LEVELS for metric in METRICS}})
    blend_rows = []
    for name in MAIN:
        for seed in args.seeds:
            blend = runs.get((name, seed), {}).get("reference_blend")
            if blend is None:
                continue
            head_levels = list(blend["weights"])
            for view in ("alone", "cross_fitted", "fitted"):
                figures = blend[f"valid_{view}"]
                blend_rows.append({"model": name, "seed": seed, "validation": VIEWS[view],
                                   **{f"{level} {kind} {metric}": figures[kind][level][metric]
                                      for level in head_levels for kind in ("overall", "active", "dormant")
                                      for metric in ("Acc@1", "MRR")},
                                   "weights (per recent-activity bucket)": "; ".join(
                                       [f"{level} {' / '.join(f'{w:g}' for w in blend['weights'][level])}"
                                        for level in head_levels]
                                       + ([f"α {' / '.join(f'{a:g}' for a in blend['alpha'])}"]
                                          if "alpha" in blend else [])) if view == "fitted" else ""})
    post_valid_rows, post_test_rows = [], []
    for name in MAIN:
        for post in POST:
            metrics = [post_runs[(name, seed, post)] for seed in args.seeds if (name, seed, post) in post_runs]
            tests = [m["test"][main_model] for m in metrics]
            if tests:
                post_test_rows.append({
                    "model": name, "post-training (served)": post + (" (the default)" if post == default_post else ""),
                    "seeds": len(tests),
                    **{f"{level} {metric}": cell_text([t["overall"][level][metric] for t in tests])
                       for level in LEVELS for metric in ("Acc@1", "MRR")},
                    "active cell Acc@1": cell_text([t["by_kind"]["active"]["cell"]["Acc@1"] for t in tests]),
                    "violation": cell_text([t["violation_rate"]["cell_in_region"] for t in tests], 3)})
            records = [m["reference_blend"] for m in metrics if "variants" in m.get("reference_blend", {})]
            if not records or post == "blend":       # the blend alone is a variant of every record
                continue
            for variant in records[0]["variants"]:
                per_seed = [r["variants"][variant] for r in records]
                post_valid_rows.append({
                    "model": name, "buckets": POST_BUCKETS.get(post, post), "variant": variant, "seeds": len(per_seed),
                    **{f"{level} {metric}": cell_text([v["cross_fitted"]["overall"][level][metric] for v in per_seed])
                       for level in LEVELS for metric in ("Acc@1", "MRR")},
                    "active cell Acc@1": cell_text([v["cross_fitted"]["active"]["cell"]["Acc@1"] for v in per_seed]),
                    "violation": cell_text([v["violation_cross_fitted"]["overall"] for v in per_seed], 3),
                    "settings (seed 0, fitted)": "; ".join(
                        [f"{level} w {' / '.join(f'{w:g}' for w in ws)}" for level, ws in
                         per_seed[0].get("weights", {}).items()]
                        + ([f"α {' / '.join(f'{a:g}' for a in per_seed[0]['alpha'])}"] if "alpha" in per_seed[0]
                           else []))})
    timing = []
    for name in MAIN:
        ms = [runs[(name, seed)] for seed in args.seeds if (name, seed) in runs]
        timing.append({"model": name, "runs": len(ms),
                       "epochs run": "/".join(str(len(m["history"])) for m in ms),
                       "best epoch": "/".join(str(m["best_epoch"]) for m in ms),
                       "s/epoch": cell_text([m["epoch_seconds"] for m in ms], 0),
                       "train s (whole run)": cell_text([m["train_seconds"] for m in ms], 0),
                       "post-training fit s": cell_text([m["reference_blend"]["seconds"] for m in ms
                                                         if "reference_blend" in m] or [float("nan")], 0)})

    final_text = []
    finished_finals = {final: [final_runs[(final, seed)] for seed in args.seeds if (final, seed) in final_runs]
                       for final in final_names}
    finished_finals = {final: ms for final, ms in finished_finals.items() if ms}
    if finished_finals:
        first = next(iter(finished_finals.values()))[0]
        final_groups = {}
        for final, ms in finished_finals.items():
            final_groups[final] = [m["test"][main_model] for m in ms]
            final_groups[f"{final_names[final]}, its selection model"] = [m["selection"]["test"] for m in ms]
        final_groups[f"{BASELINE} (fitted on train + valid)"] = [first["test"][BASELINE]]
        final_overall = [metric_row(name, [r["overall"] for r in rs], seeds=len(rs), examples=rs[0]["n_examples"])
                         for name, rs in final_groups.items()]
        final_kinds = [metric_row(name, [r["by_kind"][kind] for r in rs], kind=kind, examples=rs[0]["counts"][kind])
                       for kind in ("active", "dormant") for name, rs in final_groups.items()]
        final_violations = [{"model": name, **{group: cell_text([(r["violation_rate"] if group == "all" else
                                                                  r["violation_rate_by_kind"][group])["cell_in_region"]
                                                                 for r in rs]) for group in ("all", "active", "dormant")}}
                            for name, rs in final_groups.items()]
        final_timing = [{"model": final, "runs": len(ms),
                         "epochs (chosen by the selection run)": "/".join(str(m["best_epoch"]) for m in ms),
                         "final fit s/epoch": cell_text([m["final_fit"]["epoch_seconds"] for m in ms], 0),
                         "final fit train s": cell_text([m["final_fit"]["train_seconds"] for m in ms], 0),
                         "train + valid targets": f"{ms[0]['final_fit']['train_targets']:,}"}
                        for final, ms in finished_finals.items()]
        gap_text = ""
        if len(finished_finals) == 2:
            (_, multi_final), (_, single_final) = finished_finals.items()
            multi_mrr = [m["test"][main_model]["overall"]["cell"]["MRR"] for m in multi_final]
            single_mrr = [m["test"][main_model]["overall"]["cell"]["MRR"] for m in single_final]
            gap_text = (f"Cell MRR after the final fit, multi-level minus single-level: "
                        f"{mean_std(multi_mrr)[0] - mean_std(single_mrr)[0]:+.4f} (seed std {mean_std(multi_mrr)[1]:.4f} "
                        f"multi-level, {mean_std(single_mrr)[1]:.4f} single-level).")
        final_text = [
            "**Final fit** (`train.final_fit`; the same runs' settings: each main run above is the selection run "
            "of its final fit, which chose the number of epochs and fitted the post-training stage on validation; "
            "then a network with the same initial weights trains on train + valid, i.e. every check-in before the "
            "test period, for that many epochs on the same learning-rate curve, keeps the selection's post-training "
            "settings, and is tested on the same examples; its reference's popularity and the baseline row here "
            "are fitted on train + valid too; test)", "",
            markdown_table(final_overall), *([gap_text, ""] if gap_text else []),
            "**Final fit, active vs dormant examples (test)**", "",
            markdown_table(final_kinds), "**Final fit, hierarchy-violation rate**", "", markdown_table(final_violations),
            "**Final fit, training time** (one torch thread per run)", "", markdown_table(final_timing)]

    model = config.model
    params = validate_model_params("sequence", model)[1].model_dump()
    taxonomy = config.data.geo
    train = config.train
    body = "\n".join([
        f"Foursquare NYC check-ins (Yang et al., IEEE TSMC 2015; STAN release, 1,083 users, 5,135 venues, "
        f"147,938 check-ins). Taxonomy region ⊃ cell ⊃ venue from the venues' coordinates: "
        f"{taxonomy.method} cells of {taxonomy.cell_km:g} km, regions of {taxonomy.region_factor}x"
        f"{taxonomy.region_factor} cells. Time split: train before 80% of the time range, valid targets in the "
        f"next 10%, test targets in the last 10% (earlier check-ins are history). For every test check-in at T: "
        f"{config.examples.active_days} active examples at T-1..T-{config.examples.active_days} days (long + short "
        f"stream) and {config.examples.dormant_per_target} dormant example at T-D, D ~ U"
        f"{list(config.examples.dormant_days)} days (long-term stream only). Long-term stream = check-ins at least "
        f"7 days old at prediction time; short-term = the last 7 days.",
        "",
        f"Model: action-token transformer (dim {model.get('dim')}, {model.get('n_layers')} layer, dropout "
        f"{model.get('dropout')}, consistency weight {params['consistency_weight']}, loss weights "
        f"{params['loss_weights'] or 'all 1'}); switches on: "
        f"{', '.join(k if isinstance(params[k], bool) else f'{k} {params[k]}' for k in SWITCHES if params.get(k))}; off: "
        f"{', '.join(k for k in SWITCHES if not params.get(k)) or 'none'} (chosen on the ablations below). "
        f"Training: every training check-in is a target "
        f"({'all' if config.examples.max_targets is None else config.examples.max_targets} targets), "
        f"{train.active_per_target or config.examples.active_days} active day(s) per target and epoch drawn from "
        f"T-1..T-{config.examples.active_days} plus the dormant example, fresh every epoch; batch {train.batch_size}, "
        f"lr {train.lr} ({schedule_text(train)}), at most {train.epochs} epochs, early stopping (patience "
        f"{train.patience}) and the best epoch by validation cell MRR on "
        f"{'all' if train.valid_max_targets is None else train.valid_max_targets} validation check-ins; test is never used to "
        f"choose anything. Seeds {args.seeds} (train.seed = examples.seed): mean ± sample std. MRR is over all "
        f"nodes of the level (no cut-off). Reference: {BASELINE} = the user's recency-weighted visits (half-life "
        f"30 days) plus popularity, deterministic."
        + (f" After training, the model's distribution is blended with the reference's (reference_blend): "
           f"p = (1 - w) p_model + w p_reference, one w per level for examples with no check-in in the last "
           f"{params['blend_recent_days']:g} days and for those with some (edges {params['blend_count_edges']}), each "
           f"chosen from 0, 0.05, ..., 1 by that level's validation MRR; the test figures are the blended model's."
           if params.get("reference_blend") else "")
        + (f" Then the cells are conditioned on their region (region_conditioning): q(cell) ∝ p(cell) · "
           f"p(region)^α, α per bucket from {params['conditioning_alphas']}, chosen together with the cell's blend "
           f"weight by validation cell MRR"
           + (", and the region served is the marginal of q (tied_regions), so region and cells agree"
              if params.get("tied_regions") else "")
           + "; a single-level model gets the same stage, its regions summed from its cells."
           if params.get("region_conditioning") else ""),
        "",
        "**Overall (test)**", "", markdown_table(overall),
        f"Cell MRR, multi-level minus single-level: {gap:+.4f} (seed std {multi_std:.4f} multi-level, "
        f"{single_std:.4f} single-level).", "",
        "**Active vs dormant examples (test)**", "", markdown_table(kinds),
        "**By the target cell's number of training check-ins** (test; rare cells first)", "",
        markdown_table(frequency),
        "**Hierarchy-violation rate** (top cell outside the top region; lower is more consistent)", "",
        markdown_table(violations),
        f"**Ablations** (multi-level, validation: {sum(runs[('multi-level', seed0)]['examples']['valid'].values())} "
        f"examples; one epoch on {ABLATION_TARGETS:,} sampled training check-ins, seed {seed0}; each switch flipped "
        f"alone; the defaults were chosen on these figures)", "", markdown_table(ablation_rows),
        f"**Ablations of the switches of issue 14 on the full protocol** (multi-level, validation at the best "
        f"epoch; every training target, at most {train.epochs} epochs, patience {train.patience}, seed {seed0}; "
        f"each switch flipped alone from the earlier defaults: constant lr, no blend; the last row is the "
        f"current defaults' run before its blend)", "", markdown_table(full_rows),
        *([f"**The post-training stage served, per seed** (validation, "
           f"{sum(runs[('multi-level', seed0)]['examples']['valid'].values())} "
           f"examples: the model alone at its best epoch; the config's stage ({default_post}) with settings chosen "
           f"on the other half of the users (cross-fitted, an out-of-sample estimate); with the settings the run "
           f"keeps, fitted on all of validation)", "", markdown_table(blend_rows)] if blend_rows else []),
        *([f"**The post-training stage, variant by variant** (validation, "
           f"{sum(runs[('multi-level', seed0)]['examples']['valid'].values())} examples, cross-fitted: each half of "
           f"the users scored with the settings chosen on the other half; mean ± std over seeds; fitted by `hmtrec "
           f"refit` on each main run's trained weights). Variants: the model alone; the blend with the reference "
           f"(one weight per level and bucket); the conditioning q(cell) ∝ p(cell) · p(region)^α alone; both, the "
           f"cell weight and α chosen together; 'tied' / 'head' regions: the region served is the marginal of the "
           f"conditioned cells / the (blended) region head. Buckets: recent check-ins in the last 7 days, edges "
           f"[1] (none / some) or [1, 6] (none / 1-5 / 6+), 'x last repeat': each split by whether the two latest "
           f"check-ins share a cell. Violation: top cell outside the top region.", "",
           markdown_table(post_valid_rows)] if post_valid_rows else []),
        *([f"**Test figures of each post-training variant served** (mean ± std over seeds; every setting chosen "
           f"on validation as above; the main tables show the config's default)", "",
           markdown_table(post_test_rows)] if post_test_rows else []),
        *final_text,
        f"**Training time** (one torch thread per run, {args.jobs} runs at once on the shared machine; CPU flags: "
        f"{cpu_flags()}; training of every run listed here, ablations included, took "
        f"{sum(m['train_seconds'] for m in runs.values()) / 60:.0f} min in all"
        f"{'' if args.no_train else f'; this invocation {wall / 60:.0f} min wall clock'})", "",
        markdown_table(timing),
    ])
    print(body)
    if args.quick:
        print("\n(--quick: docs/benchmarks.md not updated)")
        return
    command = "python benchmarks/foursquare_geo.py" + "".join(f" --set {o}" for o in args.overrides)
    if args.seeds != [0, 1, 2]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.no_ablations:
        command += " --no-ablations"
    if args.no_train:
        command += " --no-train"
    if args.no_refit:
        command += " --no-refit"
    if args.final_fit != list(MAIN):
        command += " --final-fit" + "".join(f" '{name}'" for name in args.final_fit)
    path = update_section("foursquare-geo", body, title="Foursquare NYC: next destination at region and cell level",
                          command=command)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
