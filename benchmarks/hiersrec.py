"""HierSRec on the standard Diginetica session benchmark and on MovieLens-1M, beside POP.

    python benchmarks/hiersrec.py                        # both datasets, the configs' settings
    python benchmarks/hiersrec.py --datasets diginetica --set train.epochs=3
    python benchmarks/hiersrec.py --quick                # a few minutes' smoke run, not reported

Trains each dataset's config (configs/diginetica.yaml, configs/movielens-1m.yaml) through the
sequence pipeline, so the figures are exactly what `hmtrec train --config ...` gives, and rewrites
the "hiersrec" section of docs/benchmarks.md: Recall@20 (= P@20), MRR@20 and NDCG@10 at the item
and category levels, over the full catalogue and in candidate mode (items under the top categories
until ~5% of the catalogue), coverage, training time per epoch and evaluation time. Run
directories are kept under bench-results/hiersrec/.
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

DATASETS = {
    "diginetica": {"config": REPO / "configs" / "diginetica.yaml", "title": "Diginetica (SR-GNN session protocol)",
                   "published": [("SR-GNN (Wu et al., AAAI 2019)", 0.5073, 0.1759)]},
    "movielens-1m": {"config": REPO / "configs" / "movielens-1m.yaml",
                     "title": "MovieLens-1M (users 1-2999, leave-one-out by time)", "published": []},
}
QUICK = ["data.max_sequences=3000", "train.epochs=1", "train.valid_max_sequences=300"]


def run_dataset(name: str, overrides: list[str], out: Path, fresh: bool) -> tuple[dict, float, object]:
    spec = DATASETS[name]
    config = load_config(spec["config"], overrides)
    run_dir = out / name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    metrics = get_pipeline("sequence").train(config, run_dir)
    return metrics, time.perf_counter() - started, config


def rows_for(name: str, metrics: dict, config) -> list[dict]:
    levels = [level for level in next(iter(metrics["models"].values()))["levels"]]
    coarse = levels[-2] if len(levels) > 1 else None
    rows = []
    for label, result in metrics["models"].items():
        training = result["training"]
        for mode in ("full", "candidate"):
            if mode not in result:
                continue
            row = {"dataset": name, "model": label, "mode": "full" if mode == "full" else
                   f"cand. {result['candidate_fraction']:.1%}"}
            for level, tag in ((levels[-1], "item"), (coarse, "cat.")):
                if level is None:
                    continue
                values = result[mode][level]
                row[f"{tag} P@20"] = 100 * values["Recall@20"]
                row[f"{tag} MRR@20"] = 100 * values["MRR@20"]
                row[f"{tag} NDCG@10"] = 100 * values["NDCG@10"]
            row["coverage"] = f"{100 * result['candidate_coverage']:.1f}" if mode == "candidate" else "100"
            if mode == "full":
                row["epoch s"] = (f"{training['epoch_seconds']:.0f} × {training['epochs']}" if "epochs" in training
                                  else f"fit {training.get('fit_seconds', 0):.1f}")
                row["eval s"] = f"{result['seconds']:.0f}"
            else:
                row["epoch s"], row["eval s"] = "", ""
            rows.append(row)
    return rows


def settings_line(config) -> str:
    model = config.model
    return (f"HierSRec: dim {model['dim']}, {model['layers']} layers, {model['heads']} heads, dropout "
            f"{model['dropout']}, coupling {model['coupling']}, text {model['text']}, consistency "
            f"{model['consistency_weight']}; train: {config.train.epochs} epoch(s), batch {config.train.batch_size}, "
            f"{'' if config.train.epoch_fraction == 1 else f'{config.train.epoch_fraction:.0%} of the windows per epoch, '}"
            f"max_len {config.train.max_len}, lr {config.train.lr}, seed {config.train.seed}, "
            f"{config.train.threads or 'default'} thread(s), {config.train.precision}"
            f"{', on all training sessions (valid included)' if config.data.split.train_on_all else ''}; candidates: top {config.eval.candidate_level} "
            f"nodes, adaptive, fraction {config.eval.candidate_fraction}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. train.epochs=2 (every dataset) or "
                             "diginetica:train.epoch_fraction=0.5 (one dataset)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "hiersrec")
    parser.add_argument("--resume", action="store_true", help="continue existing run directories")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; does not touch docs/benchmarks.md")
    args = parser.parse_args()

    overrides = args.overrides + (QUICK if args.quick else [])
    sections, total = [], 0.0
    for name in args.datasets:
        mine = [o.split(":", 1)[1] if ":" in o.split("=", 1)[0] else o for o in overrides
                if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] == name]
        metrics, seconds, config = run_dataset(name, mine, args.out / ("quick" if args.quick else ""),
                                               fresh=not args.resume)
        total += seconds
        counts = metrics["data"]
        body = [f"### {DATASETS[name]['title']}\n",
                f"{counts['n_items']:,} items; train {counts['train']['targets']:,} targets, "
                f"test {counts['test']['targets']:,} cases. {settings_line(config)}. Wall time {seconds / 60:.1f} min.\n",
                markdown_table(rows_for(name, metrics, config), float_format="{:.2f}")]
        published = DATASETS[name]["published"]
        if published:
            body.append("\nPublished on the same protocol (item level, full catalogue): " + "; ".join(
                f"{who}: P@20 {100 * p:.2f}, MRR@20 {100 * m:.2f}" for who, p, m in published) + ".\n")
        sections.append("\n".join(body))
        print("\n".join(body))
    if args.quick:
        return
    intro = ("Metrics ×100. P@20 is Recall@20 (hit rate), as in the session-based literature. \"cand.\" rows "
             "rank only the items under the model's top categories (adaptive: categories in descending score "
             "until their items reach the target share of the catalogue; the achieved mean share is shown); "
             "a target outside them is a miss, and coverage is the share of targets inside. Category-level "
             "figures in candidate mode equal full mode by construction. Epoch time is training only; "
             "evaluation time covers full and candidate ranking of every test case. Datasets: DIGINETICA "
             "(CIKM Cup 2016) and MovieLens-1M (GroupLens), research use.\n")
    command = "python benchmarks/hiersrec.py " + " ".join(
        [f"--datasets {' '.join(args.datasets)}"] + [f"--set {o}" for o in args.overrides])
    update_section("hiersrec", intro + "\n" + "\n".join(sections) + f"\nTotal wall time {total / 60:.1f} min.\n",
                   title="HierSRec: Diginetica and MovieLens-1M", command=command.strip())


if __name__ == "__main__":
    main()
