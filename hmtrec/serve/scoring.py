"""Scoring the event after many histories at once, over the whole catalogue or over candidates.

A `HistoryScorer` wraps any sequence model through `score_next`: every level the model predicts,
over the full catalogue. Models built as an encoder plus hierarchical heads (HierSRec) get a
`HeadScorer`, which splits the computation into the stages a server needs:

    histories -> encoder -> query vector -> coarse heads (every node)
              -> candidate nodes (top nodes, or nodes up to a catalogue fraction)
              -> item head on the leaves under those nodes only

so a request with candidates scores a few percent of the catalogue. The leaf vectors (item
embeddings + metadata projections) do not change after training: they are computed once at load.
The item head's bias is folded into the leaf vectors (query [h, 1] against rows [w, b]), so full
and candidate scoring are both plain dot products.

Candidates are scored one of three ways, chosen per batch, with the same candidates in the same
order: by the compiled kernels (`kernels.py`, Numba: each query's nodes chosen and its own leaves
scored, read column-major by node); without Numba, the rows of every node the batch chose copied
side by side once (`NodeBlocks`, rows grouped by node) and multiplied with all its queries, each
row then picking its own columns; or, when the candidates are a large share of the catalogue, one
product over the whole catalogue and a gather of each row's candidate columns: over
`KERNEL_DENSE_SHARE` per query with the kernels (30%, between 20%, where they are 1.1-1.3x cheaper
than the full product at 8-32 queries, and 35%, where the two cost the same; section
`serve-stages` of docs/benchmarks.md), over `DENSE_SHARE` under the batch's nodes without them. The whole-catalogue product
reads the item table stored column-major ([D + 1, N], `item_columns`), cheaper to stream than the
row-major table at serving batch sizes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hmtrec.data.sequences import PAD
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.rundir import get_logger
from hmtrec.serve import kernels
from hmtrec.serve.candidates import NodeBlocks, adaptive_nodes, candidate_leaf_index, top_nodes

DENSE_SHARE = 0.5   # above this share of the catalogue under a batch's chosen nodes, the full product wins
KERNEL_DENSE_SHARE = 0.3   # the same for the kernels: candidates per query, as a share of the catalogue
TRACE_TOLERANCE = 1e-4   # the traced query stage must match the eager one this closely, or it is not used


@dataclass
class Scores:
    """Scores of Q queries. `levels`: full logits of every level scored over all its nodes.
    `finest`: the finest level; when candidates were used, `candidate_scores [Q, C]` and
    `candidate_ids [Q, C]` (-1 padding, score -inf) hold its scores instead of `levels[finest]`."""

    levels: dict[str, torch.Tensor]
    finest: str
    candidate_scores: torch.Tensor | None = None
    candidate_ids: torch.Tensor | None = None
    candidate_level: str | None = None
    candidate_fraction: torch.Tensor | None = None   # [Q]: share of the catalogue scored


class HistoryScorer:
    """Any sequence model: full scores through `score_next`; candidates by masking them."""

    def __init__(self, model, taxonomy: Taxonomy, max_len: int):
        self.model, self.taxonomy, self.max_len = model.eval(), taxonomy, max_len

    @property
    def finest(self) -> str:
        return max(self.model.levels, key=self.taxonomy.level_index)

    @property
    def supports_candidates(self) -> bool:
        return False

    @torch.no_grad()
    def score(self, histories: torch.Tensor) -> Scores:
        levels = {level: value.float() for level, value in self.model.score_next(histories).items()}
        return Scores(levels, self.finest)


def pad_histories(rows: list[np.ndarray], max_len: int) -> torch.Tensor:
    """Leaf-index rows (each non-empty; the most recent `max_len` kept) -> [Q, T] right-padded with PAD."""
    rows = [row[-max_len:] for row in rows]
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


class QueryStage(nn.Module):
    """A head scorer's query stage as one module: histories [Q, T] -> (logits [Q, n] of every coarse
    head in `coarse_levels` order, item query [Q, D + 1]). What the ONNX encoder graph exports and
    what `HeadScorer.trace` traces."""

    def __init__(self, scorer: "HeadScorer"):
        super().__init__()
        self.model = scorer.model
        self.register_buffer("leaf_table", scorer.leaf_table, persistent=False)
        self.coarse_levels = list(scorer.coarse_levels)

    def forward(self, histories: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, leaf_query = self.model.split_query(histories, self.leaf_table)
        query = torch.cat([leaf_query, torch.ones_like(leaf_query[:, :1])], dim=1)
        return (*[logits[level] for level in self.coarse_levels], query)


class HeadScorer(HistoryScorer):
    """An encoder with hierarchical heads whose finest head is the leaf level (HierSRec)."""

    def __init__(self, model, taxonomy: Taxonomy, max_len: int):
        super().__init__(model, taxonomy, max_len)
        self.candidate_path = "auto"        # or "dense" / "union" / "kernel": one way for every batch (tests, parity)
        self.kernels = kernels.available()  # compiled kernels choose the nodes and score the candidates
        heads = model.heads
        with torch.no_grad():
            self.leaf_table = model.leaf_vectors().detach().float().contiguous()     # [N, D] input vectors
            if heads.tied_leaf_head:
                weight, bias = self.leaf_table, heads.leaf_bias.detach().float()
            else:
                head = heads.heads[taxonomy.leaf_level]
                weight, bias = head.weight.detach().float(), head.bias.detach().float()
            # [D + 1, N]: `query @ item_columns` is the item head over the whole catalogue
            self.item_columns = torch.cat([weight, bias[:, None]], dim=1).T.contiguous()
        self.coarse_levels = heads.levels[:-1]
        self.stage = QueryStage(self).eval()
        self.traced = None                  # the stage's TorchScript trace, once `trace` made one
        self.blocks: dict[str, NodeBlocks] = {}
        # float64 NumPy, as adaptive_nodes reads them (no conversion per batch)
        self.leaf_counts = {level: taxonomy.leaf_counts(level).astype(np.float64)
                            for level in taxonomy.level_names[:-1]}

    @property
    def item_rows(self) -> torch.Tensor:
        """[N, D + 1]: the item head's row per item (a view of `item_columns`)."""
        return self.item_columns.T

    @staticmethod
    def supports(model) -> bool:
        # the model knows whether its item scores are the plain head on its leaf query
        return bool(getattr(model, "splits_item_scores", False))

    @property
    def supports_candidates(self) -> bool:
        return bool(self.coarse_levels)

    # the stages (also the pieces of the exported graph)
    def query(self, histories: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """histories [Q, T] -> ({coarse level: logits [Q, n]}, item query [Q, D + 1])."""
        *logits, query = (self.traced or self.stage)(histories)
        return dict(zip(self.coarse_levels, logits)), query

    def trace(self) -> bool:
        """Run the query stage as a frozen TorchScript trace: the same operations without Python's
        cost per module call, which dominates at serving sizes (about 1.3-1.9x cheaper per batch;
        docs/serving.md). Kept only if it matches the eager stage within TRACE_TOLERANCE on batches
        of other shapes than the traced one; otherwise the eager stage stays and the log says why."""
        generator = torch.Generator().manual_seed(0)

        def histories(rows: int, width: int) -> torch.Tensor:
            lengths = torch.randint(1, width + 1, (rows,), generator=generator)
            lengths[0] = width
            leaves = torch.randint(0, self.taxonomy.n_leaves, (rows, width), generator=generator)
            return leaves.masked_fill(torch.arange(width)[None] >= lengths[:, None], PAD)

        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the trace's Python-side checks (non-empty rows, length <= max_len) are fixed at
                # trace time; pad_histories guarantees both for every batch the server scores
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # deprecated in torch 2.13 for torch.export, which cannot follow the model's
                # data-dependent indexing; a torch without it fails here and eager serves
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.freeze(torch.jit.trace(self.stage, histories(8, min(12, self.max_len)),
                                                          check_trace=False))
                for rows, width in ((1, 1), (3, self.max_len), (17, max(1, self.max_len // 2))):
                    batch = histories(rows, width)
                    gap = max(float((eager - fast).abs().max()) for eager, fast in zip(self.stage(batch), traced(batch)))
                    if not gap <= TRACE_TOLERANCE:
                        get_logger().warning("serving the eager query stage: its trace differs by %.3g on a "
                                             "[%d, %d] batch", gap, rows, width)
                        return False
        except Exception as error:   # an operation the tracer cannot follow: eager still serves
            get_logger().warning("serving the eager query stage: tracing failed (%s)", error)
            return False
        self.traced = traced
        return True

    def candidate_nodes(self, level_logits: torch.Tensor, level: str, *, top: int | None = None,
                        fraction: float | None = None) -> torch.Tensor:
        """Chosen nodes [Q, k] (-1: padding): a row's `top` best nodes, or its nodes by descending
        score until their leaves reach `fraction` of the catalogue."""
        if self.kernels:
            counts = self.leaf_counts[level]
            return torch.from_numpy(kernels.select_nodes(
                level_logits.float().numpy(), counts, top=top, target=None if top is not None else fraction * float(counts.sum())))
        if top is not None:
            return top_nodes(level_logits, top)
        return adaptive_nodes(level_logits, self.leaf_counts[level], fraction)

    @torch.inference_mode()
    def score(self, histories: torch.Tensor, *, level: str | None = None, top: int | None = None,
              fraction: float | None = None) -> Scores:
        """Full scores, or (with `top` or `fraction`) candidates under nodes of `level` (default: the
        coarse head just above the items)."""
        coarse, query = self.query(histories)
        leaf = self.taxonomy.leaf_level
        if top is None and fraction is None:
            return Scores({**coarse, leaf: query @ self.item_columns}, leaf)
        level = level or self.coarse_levels[-1]
        if level not in coarse:
            raise ValueError(f"candidate level {level!r} has no head; heads: {self.coarse_levels}")
        nodes = self.candidate_nodes(coarse[level], level, top=top, fraction=fraction)
        scores, ids = self.candidate_scores(level, query, nodes)
        share = (ids >= 0).sum(1).float() / self.taxonomy.n_leaves
        return Scores(coarse, leaf, scores, ids, level, share)

    def candidate_scores(self, level: str, query: torch.Tensor, nodes: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, C], leaf ids [Q, C]) of the leaves under `nodes`, the way `candidate_way` picks."""
        way = self.candidate_way(level, nodes)
        if way == "dense":
            ids = candidate_leaf_index(self.taxonomy, level, nodes)
            return self.gather_candidates(query @ self.item_columns, ids), ids
        if way == "kernel":
            return self.kernel_scores(level, query, nodes)
        return self.node_blocks(level).union_scores(query, nodes)

    def prepare_candidates(self) -> None:
        """Build the default level's node blocks now, so that a server's first request with
        candidates does not wait for them."""
        if self.supports_candidates:
            blocks = self.node_blocks(self.coarse_levels[-1])
            if self.kernels:
                kernels.warm_up()
            _ = blocks.columns if self.kernels else blocks.embeddings   # the layout it will read, built now

    def node_blocks(self, level: str) -> NodeBlocks:
        if level not in self.blocks:
            self.blocks[level] = NodeBlocks(self.item_rows, self.taxonomy, level)
        return self.blocks[level]

    def candidate_way(self, level: str, nodes: torch.Tensor) -> str:
        """How to score these candidates: "dense" (the full product, then each row's columns),
        "kernel" (each row's own leaves, compiled) or "union" (the rows of every chosen node copied
        once). The full product wins when the work saved is small: with the kernels, when a query's
        candidates average over `KERNEL_DENSE_SHARE` of the catalogue; without, when the nodes
        chosen by the batch hold over `DENSE_SHARE` of it (copying their rows would cost more than
        it saves)."""
        if self.candidate_path != "auto":
            if self.candidate_path == "kernel" and not kernels.available():
                raise RuntimeError("candidate_path 'kernel' needs Numba (pip install numba)")
            return self.candidate_path
        blocks = self.node_blocks(level)
        n_leaves = self.taxonomy.n_leaves
        if self.kernels:
            return "dense" if blocks.candidate_count(nodes) > KERNEL_DENSE_SHARE * nodes.shape[0] * n_leaves else "kernel"
        return "dense" if blocks.union_size(nodes) > DENSE_SHARE * n_leaves else "union"

    def kernel_scores(self, level: str, query: torch.Tensor, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.node_blocks(level)
        scores, ids = kernels.score_nodes(query.numpy(), nodes.numpy(), blocks.offsets, blocks.columns,
                                          blocks.leaf_ids.numpy())
        return torch.from_numpy(scores), torch.from_numpy(ids)


    @staticmethod
    def gather_candidates(full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Full item scores [Q, N] -> the candidates' scores [Q, C] (-inf at padding, id -1)."""
        picked = full.gather(1, ids.clamp(min=0))
        return picked.masked_fill_(ids < 0, -math.inf)


def scorer_for(model, taxonomy: Taxonomy, max_len: int) -> HistoryScorer:
    return HeadScorer(model, taxonomy, max_len) if HeadScorer.supports(model) else HistoryScorer(model, taxonomy, max_len)

