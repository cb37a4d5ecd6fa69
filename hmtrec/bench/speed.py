"""Speed and scale micro-benchmarks, measured in one process so every figure shares the machine
state of the moment:

- scoring: per-query latency and throughput of exact full-catalogue top-k against candidate
  top-k (top nodes of a coarse level, then only their leaves), on a synthetic catalogue of
  `n_items` leaves (default 1M) under `n_nodes` coarse nodes;
- training: examples (target positions) per second of a training step of each neural model, the
  FLOPs of that step (torch's FlopCounterMode: matrix multiplies and attention, forward and
  backward) and the GFLOP/s it achieves, next to a plain matrix multiply timed in the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hmtrec.bench.measure import matmul_gflops, step_flops, time_call
from hmtrec.data.sequences import Dataset, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.serve.candidates import NodeBlocks, full_topk, k_for_fraction, top_nodes


def synthetic_catalogue(n_items: int, n_nodes: int, *, seed: int = 0) -> Taxonomy:
    """Two levels: `n_nodes` coarse nodes with Zipf-like sizes (some large, many small), n_items leaves."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_nodes + 1) ** 0.7
    sizes = np.maximum(1, np.floor(weights / weights.sum() * (n_items - n_nodes)).astype(np.int64) + 1)
    sizes[0] += n_items - sizes.sum()
    parent = rng.permutation(np.repeat(np.arange(n_nodes), sizes))
    return Taxonomy(["node", "leaf"], [np.arange(n_nodes).astype(str), np.arange(n_items).astype(str)],
                    [None, parent])


@dataclass
class ScoringFigures:
    mode: str
    candidate_fraction: float
    latency_ms: float           # one query, median
    throughput_qps: float       # queries per second in batches of `batch`
    batch: int


def scoring_benchmark(n_items: int = 1_000_000, n_nodes: int = 1000, dim: int = 64, *, k: int = 20,
                      fractions: tuple[float, ...] = (0.01, 0.05), batch: int = 256, repeats: int = 5,
                      seed: int = 0) -> tuple[list[ScoringFigures], Taxonomy]:
    """Full top-k over every leaf vs candidate top-k under the best nodes, same query vectors."""
    generator = torch.Generator().manual_seed(seed)
    taxonomy = synthetic_catalogue(n_items, n_nodes, seed=seed)
    leaves = torch.randn(n_items, dim, generator=generator) / math.sqrt(dim)
    nodes = torch.randn(n_nodes, dim, generator=generator) / math.sqrt(dim)
    queries = torch.randn(batch, dim, generator=generator)
    one = queries[:1]
    blocks = NodeBlocks(leaves, taxonomy, "node")      # regrouped once, as a server would

    def full(q):
        return full_topk(q, leaves, k)

    figures = [ScoringFigures("full", 1.0,
                              time_call(lambda: full(one), repeats=repeats)["median"] * 1e3,
                              batch / time_call(lambda: full(queries), repeats=max(2, repeats // 2))["median"],
                              batch)]
    for fraction in fractions:
        n_best = k_for_fraction(taxonomy, "node", fraction)

        def candidates(q, n_best=n_best):
            blocks.topk(q, top_nodes(q @ nodes.T, n_best), k)

        # the fraction actually reached by these queries' chosen nodes
        chosen = top_nodes(queries @ nodes.T, n_best)
        reached = float(torch.from_numpy(taxonomy.leaf_counts("node"))[chosen].sum(1).double().mean()) / n_items
        figures.append(ScoringFigures(f"candidates (top {n_best} nodes)", reached,
                                      time_call(lambda: candidates(one), repeats=repeats)["median"] * 1e3,
                                      batch / time_call(lambda: candidates(queries), repeats=max(2, repeats // 2))["median"],
                                      batch))
    return figures, taxonomy


@dataclass
class TrainingFigures:
    model: str
    examples_per_second: float
    step_seconds: float
    gflop_per_step: float
    achieved_gflops: float
    matmul_gflops: float


def _training_data(n_items: int, n_nodes: int, n_sequences: int, length: int, seed: int) -> tuple[Dataset, SequenceData]:
    taxonomy = synthetic_catalogue(n_items, n_nodes, seed=seed)
    rng = np.random.default_rng(seed)
    leaves = rng.integers(0, n_items, size=n_sequences * length)
    data = SequenceData(leaves, np.arange(n_sequences + 1) * length, np.arange(n_sequences))
    return Dataset("speed", data, taxonomy, [f"item {i}" for i in range(n_items)]), data


def training_benchmark(models: list[dict], *, n_items: int = 43_097, n_nodes: int = 995, batch_size: int = 128,
                       max_len: int = 20, steps: int = 5, matmul_size: int = 1024, seed: int = 0
                       ) -> list[TrainingFigures]:
    """Time `steps` training steps (forward, backward, AdamW) of each model spec ({name, params})
    on random sequences over a catalogue the size of Diginetica's."""
    from hmtrec.models.registry import build_model, validate_model_params

    dataset, data = _training_data(n_items, n_nodes, batch_size, max_len + 1, seed)
    windows = make_windows(data, max_len)
    batch = collate_windows(data, windows, np.arange(len(windows.start))[:batch_size])
    n_examples = int((batch["targets"] >= 0).sum())
    figures = []
    for spec in models:
        spec = dict(spec)
        label = spec.pop("label", spec["name"])
        torch.manual_seed(seed)
        entry, params = validate_model_params("sequence", spec)
        model = build_model(entry, params, taxonomy=dataset.taxonomy, dataset=dataset, max_len=max_len)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            loss, _ = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        flops = step_flops(lambda: model.loss(batch)[0].backward())
        optimizer.zero_grad(set_to_none=True)
        timing = time_call(step, repeats=steps, warmup=1)
        reference = matmul_gflops(matmul_size)  # measured right after, under the same load
        seconds = timing["median"]
        figures.append(TrainingFigures(label, n_examples / seconds, seconds, flops / 1e9, flops / seconds / 1e9,
                                       reference))
    return figures


def scoring_rows(figures: list[ScoringFigures]) -> list[dict]:
    full = figures[0]
    return [{"scoring": f.mode, "candidate fraction": f"{f.candidate_fraction * 100:.2f}%",
             "latency ms/query (batch 1)": f"{f.latency_ms:.2f}",
             f"throughput queries/s (batch {f.batch})": f"{f.throughput_qps:,.0f}",
             "speed-up vs full": f"{full.latency_ms / f.latency_ms:.1f}× / {f.throughput_qps / full.throughput_qps:.1f}×"}
            for f in figures]


def training_rows(figures: list[TrainingFigures]) -> list[dict]:
    return [{"model": f.model, "examples/s": f"{f.examples_per_second:,.0f}", "s/step": f"{f.step_seconds:.3f}",
             "GFLOP/step": f"{f.gflop_per_step:.2f}", "achieved GFLOP/s": f"{f.achieved_gflops:.1f}",
             "plain matmul GFLOP/s": f"{f.matmul_gflops:.1f}",
             "share of matmul": f"{f.achieved_gflops / f.matmul_gflops * 100:.0f}%"} for f in figures]
