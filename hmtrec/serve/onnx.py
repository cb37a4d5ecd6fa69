"""ONNX export of a HierSRec-style model, and a scorer that runs it on ONNX Runtime.

`hmtrec export RUN_DIR --format onnx` writes RUN_DIR/onnx/ (or --output):

    encoder.onnx     histories [Q, T] int64 (PAD = -1 after each history)
                       -> logits_<level> [Q, n_nodes] for every coarse head, query [Q, D + 1]
    items.onnx       query [Q, D + 1], candidate_ids [Q, C] int64 (-1: padding)
                       -> logits [Q, C] (-inf at padding): the item head on the candidates only
    items_full.onnx  query [Q, D + 1] -> logits [Q, n_items]: the item head on the whole catalogue
    items_rows.onnx  query [Q, D + 1], item_ids [U] int64 -> logits [Q, U]: the item head on items
                       shared by the batch (the union of its candidates, on large catalogues)
    manifest.json    levels, sizes, opset, and the parity measured against PyTorch at export

The chain is encoder -> coarse heads -> candidate choice -> item head. The candidate choice (top
nodes, or nodes up to a catalogue fraction, and the leaves under them) runs on the host between the
two graphs, as it does with PyTorch (`hmtrec.serve.scoring.HeadScorer`): it is data-dependent
indexing, and one graph taking candidate ids would need the encoder run twice per request. The
leaf vectors are constants of the graphs (computed once, like the PyTorch scorer's table).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hmtrec.errors import HmtrecError
from hmtrec.rundir import ArtefactError, make_dir, read_json, write_json
from hmtrec.serve.candidates import candidate_leaf_index
from hmtrec.serve.scoring import HeadScorer, Scores

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
OPSET = 17
PARITY_TOLERANCE = 1e-4
LEGACY_DENSE_ITEMS = 200_000


class _Items(nn.Module):
    def __init__(self, item_rows: torch.Tensor):
        super().__init__()
        self.register_buffer("item_rows", item_rows.clone())

    def forward(self, query: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        rows = self.item_rows[candidate_ids.clamp(min=0)]                  # [Q, C, D + 1]
        logits = torch.einsum("qd,qcd->qc", query, rows)
        return torch.where(candidate_ids >= 0, logits, torch.full_like(logits, float("-inf")))


class _ItemRows(nn.Module):
    def __init__(self, item_rows: torch.Tensor):
        super().__init__()
        self.register_buffer("item_rows", item_rows.clone())

    def forward(self, query: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        return query @ self.item_rows.index_select(0, item_ids).T


class _ItemsFull(nn.Module):
    def __init__(self, item_columns: torch.Tensor):
        super().__init__()
        self.register_buffer("item_columns", item_columns.clone())      # [D + 1, N]

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return query @ self.item_columns


def _export(module: nn.Module, inputs: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    import inspect
    import warnings

    module.eval()
    # the TorchScript exporter (torch >= 2.9 defaults to the torch.export one, which needs onnxscript)
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer and deprecation notices; parity is checked below
        torch.onnx.export(module, inputs, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, **legacy)


def export_onnx(run_dir: str | Path, output: str | Path | None = None, *, label: str | None = None) -> dict:
    """Export the run's main model (or `label`) as the three graphs above; check them against
    PyTorch on sample histories and record the largest difference in the manifest."""
    from hmtrec.serve.artefact import load_sequence_run
    from hmtrec.rundir import RunDir

    run = RunDir(run_dir)
    run.require_done("`hmtrec export`")
    artefact = load_sequence_run(run.path, labels=[label] if label else None)
    scorer = artefact.scorer(label)
    if not isinstance(scorer, HeadScorer):
        raise HmtrecError(f"model {label or artefact.main!r} is not an encoder with hierarchical heads ending at "
                          f"the items whose item scores are the plain item head (HierSRec without "
                           f"repeat_explore, leaf_scale, factorized or exclude_seen); only such models "
                           f"are exported to ONNX")
    if not scorer.coarse_levels:
        raise HmtrecError("the model has no coarse head: nothing to pick candidates with")
    out = make_dir(Path(output) if output is not None else run.path / ONNX_DIR)
    max_len = artefact.config.eval_max_len
    rng = np.random.default_rng(0)
    sample = [rng.integers(0, artefact.taxonomy.n_leaves, size=n) for n in (1, max_len, max(1, max_len // 2), 3)]
    from hmtrec.serve.scoring import pad_histories

    histories = pad_histories(sample, max_len)
    names = [f"logits_{level}" for level in scorer.coarse_levels]
    started = time.perf_counter()
    _export(scorer.stage, (histories,), out / "encoder.onnx", ["histories"], [*names, "query"],
            {"histories": {0: "queries", 1: "positions"}, **{n: {0: "queries"} for n in [*names, "query"]}})
    with torch.no_grad():
        _, query = scorer.query(histories)
    ids = candidate_leaf_index(artefact.taxonomy, scorer.coarse_levels[-1],
                               torch.topk(scorer.query(histories)[0][scorer.coarse_levels[-1]], 2).indices)
    _export(_Items(scorer.item_rows.contiguous()), (query, ids), out / "items.onnx", ["query", "candidate_ids"], ["logits"],
            {"query": {0: "queries"}, "candidate_ids": {0: "queries", 1: "candidates"},
             "logits": {0: "queries", 1: "candidates"}})
    _export(_ItemsFull(scorer.item_columns), (query,), out / "items_full.onnx", ["query"], ["logits"],
            {"query": {0: "queries"}, "logits": {0: "queries"}})
    _export(_ItemRows(scorer.item_rows.contiguous()), (query, ids[0][ids[0] >= 0]), out / "items_rows.onnx",
            ["query", "item_ids"], ["logits"],
            {"query": {0: "queries"}, "item_ids": {0: "items"}, "logits": {0: "queries", 1: "items"}})
    manifest = {"model": label or artefact.main, "levels": scorer.coarse_levels, "item_level": artefact.taxonomy.leaf_level,
                "n_items": artefact.taxonomy.n_leaves, "max_len": max_len, "opset": OPSET,
                "query_dim": int(scorer.item_rows.shape[1]), "export_seconds": time.perf_counter() - started}
    onnx_scorer = OnnxScorer(out, manifest, scorer)
    manifest["parity_max_abs_diff"] = parity(scorer, onnx_scorer, sample, artefact.taxonomy)
    if manifest["parity_max_abs_diff"] > PARITY_TOLERANCE:
        raise HmtrecError(f"ONNX graphs differ from PyTorch by {manifest['parity_max_abs_diff']:.2e} "
                          f"(> {PARITY_TOLERANCE}); not exported")
    write_json(out / MANIFEST, manifest)
    return {**manifest, "folder": str(out)}


def parity(reference: HeadScorer, other: "OnnxScorer", histories: list[np.ndarray], taxonomy) -> float:
    """Largest |difference| of every output (coarse logits, full and candidate item logits; the
    candidates every way on both sides: the full product's columns, the chosen nodes' rows
    (items_rows.onnx), each candidate's row (items.onnx))."""
    from hmtrec.serve.scoring import pad_histories

    batch = pad_histories(histories, reference.max_len)
    worst = 0.0
    paths = reference.candidate_path, other.candidate_path
    mine = ("dense", "union", "kernel") if reference.kernels else ("dense", "union")
    ways = [("auto", "auto")] + [(a, b) for a in mine for b in ("dense", "union", "gather")
                                 if other.rows_session or b != "union"]
    try:
        for options in ({}, {"top": 2}, {"fraction": 0.05}):
            for reference.candidate_path, other.candidate_path in ways[:1] if not options else ways:
                worst = max(worst, _largest_difference(reference.score(batch, **options),
                                                       other.score(batch, **options), batch.shape[0]))
    finally:
        reference.candidate_path, other.candidate_path = paths
    return worst


def _largest_difference(a: Scores, b: Scores, n_rows: int) -> float:
    worst = 0.0
    for level in a.levels:
        worst = max(worst, float((a.levels[level] - b.levels[level]).abs().max()))
    if a.candidate_scores is not None:
        # the same candidates (same coarse logits up to float noise), maybe in another order
        for row in range(n_rows):
            ids_a, ids_b = a.candidate_ids[row], b.candidate_ids[row]
            keep_a, keep_b = ids_a >= 0, ids_b >= 0
            order_a, order_b = torch.argsort(ids_a[keep_a]), torch.argsort(ids_b[keep_b])
            if not torch.equal(ids_a[keep_a][order_a], ids_b[keep_b][order_b]):
                return float("inf")
            worst = max(worst, float((a.candidate_scores[row][keep_a][order_a]
                                      - b.candidate_scores[row][keep_b][order_b]).abs().max()))
    return worst


class OnnxScorer(HeadScorer):
    """The HeadScorer's stages on ONNX Runtime: same candidates, same outputs (within float noise)."""

    def __init__(self, folder: Path, manifest: dict, reference: HeadScorer, threads: int | None = None):
        import onnxruntime as ort

        self.__dict__.update({k: v for k, v in reference.__dict__.items() if k != "blocks"})
        self.blocks = {}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle pool threads would spin on the cores the server's event loop needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name):
            path = Path(folder) / name
            if not path.exists():
                raise ArtefactError(path, "is missing", "run `hmtrec export RUN_DIR --format onnx` first")
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as error:
                raise ArtefactError(path, f"not a valid ONNX graph ({str(error).splitlines()[0][:200]})",
                                    "export it again") from None

        self.encoder_session = session("encoder.onnx")
        self.items_session = session("items.onnx")
        self.full_session = session("items_full.onnx")
        # exports before items_rows.onnx existed score large catalogues' candidates through items.onnx
        self.rows_session = session("items_rows.onnx") if (Path(folder) / "items_rows.onnx").exists() else None
        self.manifest = manifest

    @classmethod
    def load(cls, run_dir: str | Path, artefact, threads: int | None = None) -> "OnnxScorer":
        folder = Path(run_dir) / ONNX_DIR
        manifest = read_json(folder / MANIFEST, "run `hmtrec export RUN_DIR --format onnx` first")
        reference = artefact.scorer(manifest["model"])
        if manifest["n_items"] != artefact.taxonomy.n_leaves:
            raise ArtefactError(folder / MANIFEST, "was exported for another catalogue", "export it again")
        return cls(folder, manifest, reference, threads)

    def _score_rows(self, query: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.rows_session.run(None, {"query": query.numpy(), "item_ids": item_ids.numpy()})[0])

    def query(self, histories: torch.Tensor):
        outputs = self.encoder_session.run(None, {"histories": histories.numpy()})
        logits = {level: torch.from_numpy(value) for level, value in zip(self.coarse_levels, outputs[:-1])}
        return logits, torch.from_numpy(outputs[-1])

    def score(self, histories: torch.Tensor, *, level: str | None = None, top: int | None = None,
              fraction: float | None = None) -> Scores:
        coarse, query = self.query(histories)
        leaf = self.taxonomy.leaf_level
        if top is None and fraction is None:
            full = self.full_session.run(None, {"query": query.numpy()})[0]
            return Scores({**coarse, leaf: torch.from_numpy(full)}, leaf)
        level = level or self.coarse_levels[-1]
        if level not in coarse:
            raise ValueError(f"candidate level {level!r} has no head; heads: {self.coarse_levels}")
        nodes = self.candidate_nodes(coarse[level], level, top=top, fraction=fraction)
        # the ways of HeadScorer.score, each product run by ONNX Runtime but the kernels' (the same
        # item table, compiled by Numba); without kernels, an export without items_rows.onnx takes
        # the full product up to LEGACY_DENSE_ITEMS items, else items.onnx
        if self.rows_session is None and self.candidate_path == "auto" and not self.kernels:
            self.candidate_path = "dense" if self.taxonomy.n_leaves <= LEGACY_DENSE_ITEMS else "gather"
        way = "gather" if self.candidate_path == "gather" else self.candidate_way(level, nodes)
        if way == "dense":
            ids = candidate_leaf_index(self.taxonomy, level, nodes)
            full = self.full_session.run(None, {"query": query.numpy()})[0]
            logits = self.gather_candidates(torch.from_numpy(full), ids)
        elif way == "kernel":
            logits, ids = self.kernel_scores(level, query, nodes)
        elif way == "union" and self.rows_session is not None:
            logits, ids = self.node_blocks(level).union_scores(query, nodes, score_rows=self._score_rows)
        else:
            ids = candidate_leaf_index(self.taxonomy, level, nodes)
            logits = torch.from_numpy(self.items_session.run(None, {"query": query.numpy(),
                                                                    "candidate_ids": ids.numpy()})[0])
        share = (ids >= 0).sum(1).float() / self.taxonomy.n_leaves
        return Scores(coarse, leaf, logits, ids, level, share)
