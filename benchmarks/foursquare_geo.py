"""Next-destination prediction on Foursquare NYC at region and cell level (issue 5).

    python benchmarks/foursquare_geo.py                  # the settings below, ~15 minutes on 2 shared cores
    python benchmarks/foursquare_geo.py --quick          # a smoke run, not written to docs/benchmarks.md
    python benchmarks/foursquare_geo.py --set train.epochs=4

Trains configs/geo/foursquare-nyc.yaml through the geo pipeline (exactly what `hmtrec train`
does) in three variants and rewrites the "foursquare-geo" section of docs/benchmarks.md:
- multi-level: region and cell heads, joint loss with the consistency term;
- no consistency: the same model with consistency_weight 0;
- single-level: a cell head only (regions derived by summing cell probabilities);
plus the non-neural reference geo-history-pop (the user's recency-weighted visits plus
popularity). Tables: Acc@1, Acc@5 and MRR at region and cell level; the same bucketed by the
target cell's training frequency; active vs dormant examples; hierarchy-violation rate (top cell
outside the top region). Run directories are kept under bench-results/foursquare-geo/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hmtrec.bench.report import markdown_table, update_section  # noqa: E402
from hmtrec.config import load_config  # noqa: E402
from hmtrec.pipelines import get_pipeline  # noqa: E402

CONFIG = REPO / "configs" / "geo" / "foursquare-nyc.yaml"
VARIANTS = {
    "multi-level": [],
    "no consistency": ["model.consistency_weight=0.0"],
    "single-level (cell)": ["model.levels=[cell]"],
}
BASELINE = "geo-history-pop"
QUICK = ["data.max_sequences=150", "examples.max_targets=1000", "train.epochs=1", "train.valid_max_targets=300",
         "eval.max_targets=500"]


def run_variant(name: str, overrides: list[str], out: Path) -> tuple[dict, float, object]:
    config = load_config(CONFIG, overrides)
    run_dir = out / name.replace(" ", "-").replace("(", "").replace(")", "")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    metrics = get_pipeline("geo").train(config, run_dir)
    return metrics, time.perf_counter() - started, config


def metric_row(label: str, per_level: dict, levels=("region", "cell"), **extra) -> dict:
    row = {"model": label, **extra}
    for level in levels:
        for metric in ("Acc@1", "Acc@5", "MRR"):
            row[f"{level} {metric}"] = per_level[level][metric]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=value")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; does not touch docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "foursquare-geo")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + args.overrides

    results, seconds, epochs, config = {}, {}, {}, None
    for name, variant in VARIANTS.items():
        extra = variant + ([] if name == "multi-level" else ["baselines=[]"])
        metrics, elapsed, config = run_variant(name, overrides + extra, args.out)
        main_model = config.model["name"]
        results[name] = metrics["test"][main_model]
        seconds[name] = elapsed
        epochs[name] = (len(metrics["history"]), metrics["best_epoch"], metrics["epoch_seconds"])
        if name == "multi-level":
            results[BASELINE] = metrics["test"][BASELINE]

    overall = [metric_row(name, r["overall"], examples=r["n_examples"]) for name, r in results.items()]
    kinds = [metric_row(name, r["by_kind"][kind], kind=kind, examples=r["counts"][kind])
             for name, r in results.items() for kind in ("active", "dormant")]
    frequency = []
    for name, r in results.items():
        for bucket, values in r["by_frequency"]["buckets"].items():
            frequency.append(metric_row(name, values, **{"cell train events": bucket, "examples": values["n"]}))
    violations = [{"model": name, "all": r["violation_rate"]["cell_in_region"],
                   "active": r["violation_rate_by_kind"]["active"]["cell_in_region"],
                   "dormant": r["violation_rate_by_kind"]["dormant"]["cell_in_region"]}
                  for name, r in results.items()]
    timing = [{"model": name, "epochs run": e[0], "best epoch": e[1], "s/epoch": e[2],
               "total s (train+eval)": seconds[name]} for name, e in epochs.items()]

    taxonomy = config.data.geo
    body = "\n".join([
        f"Foursquare NYC check-ins (Yang et al., IEEE TSMC 2015; STAN release, 1,083 users, 5,135 venues, "
        f"147,938 check-ins). Taxonomy region ⊃ cell ⊃ venue from the venues' coordinates: "
        f"{taxonomy.method} cells of {taxonomy.cell_km:g} km, regions of {taxonomy.region_factor}x"
        f"{taxonomy.region_factor} cells. Time split: train before 80% of the time range, valid targets in the "
        f"next 10%, test targets in the last 10% (earlier check-ins are history). For every test check-in at T: "
        f"{config.examples.active_days} active examples at T-1..T-{config.examples.active_days} days (long + short "
        f"stream) and {config.examples.dormant_per_target} dormant example at T-D, D ~ U"
        f"{list(config.examples.dormant_days)} days (long-term stream only). Long-term stream = check-ins at least "
        f"7 days old at prediction time; short-term = the last 7 days. Model: action-token transformer "
        f"(dim {config.model.get('dim')}, {config.model.get('n_layers')} layer(s), copy pointer "
        f"{'on' if config.model.get('copy_history', True) else 'off'}), {config.train.epochs} epochs of "
        f"{config.examples.max_targets} sampled training check-ins (x {config.examples.active_days} active + "
        f"dormant examples), best epoch by validation cell MRR. MRR is over all nodes of the level (no cut-off). "
        f"Reference: {BASELINE} = the user's recency-weighted visits (half-life 30 days) plus popularity.",
        "", "**Overall (test)**", "", markdown_table(overall),
        "**Active vs dormant examples**", "", markdown_table(kinds),
        "**By the target cell's number of training check-ins** (rare cells first)", "", markdown_table(frequency),
        "**Hierarchy-violation rate** (top cell outside the top region; lower is more consistent)", "",
        markdown_table(violations),
        "**Training**", "", markdown_table(timing, float_format="{:.1f}"),
    ])
    print(body)
    if args.quick:
        print("\n(--quick: docs/benchmarks.md not updated)")
        return
    command = "python benchmarks/foursquare_geo.py" + "".join(f" --set {o}" for o in args.overrides)
    path = update_section("foursquare-geo", body, title="Foursquare NYC: next destination at region and cell level",
                          command=command)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
