"""Evaluator throughput and memory: exact full-catalogue and candidate-mode ranking of POP on the
real Diginetica protocol, and of a simple dot-product model on synthetic catalogues of Diginetica
size (43,097 items, 995 categories) and of 1M items, with the score budget bounding memory.

Each configuration runs in a fresh process so its peak resident memory is its own. The model is
deliberately cheap (one embedding lookup and a matrix product), so the figures are dominated by
what the evaluator itself does: scoring the catalogue, exact ranks at every level, candidate masks.

    python benchmarks/evaluator.py            # writes the "evaluator" section of docs/benchmarks.md
    python benchmarks/evaluator.py --quick    # smaller, for a smoke run (prints only)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time

import numpy as np
import torch

from hmtrec.bench.report import markdown_table, update_section
from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model

THREADS = 1
DIM = 64


def synthetic_catalogue(n_items: int, n_categories: int, n_cases: int, seed: int = 0):
    """Items spread over categories, Zipf-popular; sessions of 2-10 events that mostly stay in
    one category, so the category head carries real signal."""
    rng = np.random.default_rng(seed)
    category = np.r_[np.arange(n_categories), rng.integers(0, n_categories, n_items - n_categories)]
    taxonomy = Taxonomy(["category", "item"], [np.arange(n_categories).astype(str), np.arange(n_items).astype(str)],
                        [None, category])
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    lengths = rng.integers(2, 11, size=max(1, n_cases // 5))
    lengths = lengths[np.cumsum(lengths - 1) <= n_cases]
    starts = rng.choice(n_items, size=len(lengths), p=popularity)
    leaves = np.empty(lengths.sum(), dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)]
    by_category = np.argsort(category, kind="stable")
    category_start = np.searchsorted(category[by_category], np.arange(n_categories))
    category_size = np.bincount(category, minlength=n_categories)
    for index, (first, length) in enumerate(zip(starts, lengths)):
        same = category[first]
        picks = by_category[category_start[same] + rng.integers(0, category_size[same], length)]
        jump = rng.random(length) < 0.3
        picks[jump] = rng.choice(n_items, size=int(jump.sum()), p=popularity)
        picks[0] = first
        leaves[offsets[index]:offsets[index + 1]] = picks
    data = SequenceData(leaves, offsets, np.arange(len(lengths)))
    return taxonomy, data, category


class DotModel(torch.nn.Module):
    """Query = embedding of the last event; item scores q . e_item, category scores q . e_category,
    where item embeddings are their category's plus noise."""

    def __init__(self, category: np.ndarray, n_categories: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(n_categories, DIM, generator=generator)
        items = centres[torch.from_numpy(category)] + 0.5 * torch.randn(len(category), DIM, generator=generator)
        self.items = torch.nn.Parameter(items, requires_grad=False)
        self.categories = torch.nn.Parameter(centres, requires_grad=False)

    def predict(self, batch):
        query = self.items[batch["inputs"][batch["targets"] != PAD]]
        return {"category": query @ self.categories.T, "item": query @ self.items.T}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Make the kernel's high-water mark (VmHWM) restart from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def real_diginetica_pop():
    """POP on the standard Diginetica protocol: its scores cost nothing, so the time is the evaluator's."""
    from hmtrec.data.loading import DataConfig, load_data
    from hmtrec.models.registry import build_model, validate_model_params

    prepared = load_data(DataConfig(source="diginetica-sessions"))
    entry, params = validate_model_params("sequence", {"name": "pop"})
    model = build_model(entry, params, taxonomy=prepared.taxonomy, dataset=prepared.dataset)
    model.fit(prepared.train)
    return prepared.taxonomy, prepared.test, model


def run_one(config: dict) -> dict:
    torch.set_num_threads(THREADS)
    if config.get("real") == "diginetica":
        taxonomy, data, model = real_diginetica_pop()
    else:
        taxonomy, data, category = synthetic_catalogue(config["items"], config["categories"], config["cases"])
        model = DotModel(category, config["categories"])
    settings = EvalSettings(ks=[10, 20], score_budget_mb=config["budget_mb"], segments=[],
                            candidate_fraction=config.get("fraction"))
    # warm-up on a few sequences: pages in library code and thread pools, which are not the evaluator's
    evaluate_model(model, data.select(np.arange(min(20, data.n_sequences))), taxonomy, settings, max_len=10)
    reset_peak_rss()
    before = current_rss_mb()
    started = time.perf_counter()
    result = evaluate_model(model, data, taxonomy, settings, max_len=10)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    return {"data": config.get("real", "synthetic"), "model": "POP" if config.get("real") else "dot",
            "items": taxonomy.n_leaves, "cases": result["n_cases"], "budget MB": config["budget_mb"],
            "candidates": f"adaptive {config['fraction']:.0%}" if config.get("fraction") else "–",
            "seconds": seconds, "s / 10k cases": seconds / result["n_cases"] * 1e4,
            "cases / s": result["n_cases"] / seconds,
            "RSS before MB": before, "peak RSS MB": peak, "peak - before MB": peak - before,
            "item MRR@20": result["full"]["item"]["MRR@20"],
            "cand item MRR@20": result.get("candidate", {}).get("item", {}).get("MRR@20", "–"),
            "coverage": result.get("candidate_coverage", "–"),
            "fraction": result.get("candidate_fraction", "–")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    args = parser.parse_args()
    if args.quick:
        configs = [dict(items=20_000, categories=400, cases=2_000, budget_mb=64, fraction=None),
                   dict(items=20_000, categories=400, cases=2_000, budget_mb=64, fraction=0.05)]
    else:
        diginetica = dict(items=43_097, categories=995, cases=20_000)
        large = dict(items=1_000_000, categories=10_000, cases=2_000)
        configs = [dict(real="diginetica", budget_mb=256, fraction=None),
                   dict(real="diginetica", budget_mb=256, fraction=0.05),
                   dict(diginetica, budget_mb=256, fraction=None), dict(diginetica, budget_mb=256, fraction=0.05),
                   dict(diginetica, budget_mb=32, fraction=0.05),
                   dict(large, budget_mb=256, fraction=0.05), dict(large, budget_mb=64, fraction=0.05)]
    load_before = os.getloadavg()[0]
    rows = []
    # glibc keeps freed blocks of a few MB in its heap, so a process's RSS drifts far above what it
    # uses; a fixed mmap threshold hands every large block back on free and exposes the real working set.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    context = multiprocessing.get_context("spawn")
    for config in configs:
        with context.Pool(1) as pool:
            row = pool.apply(run_one, (config,))
        print(row, flush=True)
        rows.append(row)
    if args.quick:
        return
    columns = ["data", "model", "items", "cases", "budget MB", "candidates", "seconds", "s / 10k cases", "cases / s",
               "RSS before MB", "peak RSS MB", "peak - before MB", "item MRR@20", "cand item MRR@20", "coverage", "fraction"]
    load_after = os.getloadavg()[0]
    body = (f"Exact ranks at the category and item level of every case: POP on the standard Diginetica "
            f"protocol (all 60,858 test cases; POP's scores cost nothing, so the time is the evaluator's), "
            f"and a dot-product model (d={DIM}, one query per case) on synthetic catalogues of Diginetica's "
            f"size and of 1M items. {THREADS} CPU thread; each row in a fresh process. Other jobs shared "
            f"the machine (load average {load_before:.1f} before, {load_after:.1f} after), so seconds are "
            "pessimistic; memory is not affected. `RSS before` is the "
            "process after building the catalogue and model, `peak` the high-water mark during evaluation "
            "only (reset through /proc/self/clear_refs), with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc returns freed "
            "blocks; the difference is the evaluation's working set, "
            "which the score budget bounds (cases scored together x items x 16 bytes, plus the model's own "
            "temporaries).\n\n"
            + markdown_table(rows, columns, float_format="{:.3f}"))
    update_section("evaluator", body, title="Evaluator throughput and memory",
                   command="python benchmarks/evaluator.py")


if __name__ == "__main__":
    sys.exit(main())
