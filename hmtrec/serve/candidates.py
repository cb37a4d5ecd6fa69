"""Candidate generation: pick the best nodes of a coarse taxonomy level, keep only the leaves under
them.

Everything works on whole batches of queries at once (sort, cumsum, scatter, gather): there is no
Python loop over queries or leaves (`NodeBlocks.topk` loops over the distinct chosen nodes, one
matrix product per node block). Ties between equal node scores are broken by the lower
node index, so candidate sets are deterministic.

Two ways to size the candidate set:
- fixed k: the top `k` nodes of every query (`top_nodes`); `k_for_fraction` picks the k whose
  expected share of the catalogue is a target fraction;
- adaptive: per query, nodes in descending score until their leaves reach a target fraction of the
  catalogue (`adaptive_node_mask`), so a query whose best nodes are small categories gets more of them.

For serving, `full_topk` and `NodeBlocks.topk` score query vectors against leaf embeddings, over the
whole catalogue in bounded-memory chunks or over the candidate leaves only (one matrix product per
chosen node); the benchmark harness times one against the other.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import numpy as np
import torch

from hmtrec.data.taxonomy import Taxonomy

CandidateMode = Literal["fixed_k", "adaptive"]


# ---- choosing nodes ----------------------------------------------------------------------------

def _descending_order(level_scores: torch.Tensor) -> torch.Tensor:
    """Node indices by descending score, ties by ascending index (a stable sort)."""
    return torch.sort(level_scores, dim=1, descending=True, stable=True).indices


def top_nodes(level_scores: torch.Tensor, k: int) -> torch.Tensor:
    """level_scores [M, n_nodes] -> indices [M, min(k, n_nodes)] of each row's best nodes, best
    first; equal scores are taken in ascending node order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), level_scores.shape[1])
    return _descending_order(level_scores)[:, :k]


def k_for_fraction(taxonomy: Taxonomy, level: int | str, fraction: float) -> int:
    """The fixed k whose candidate set covers about `fraction` of the catalogue on average: a node
    of `level` holds n_leaves / n_nodes leaves on average, so k = round(fraction * n_nodes),
    clipped to [1, n_nodes]. The fraction actually reached depends on which nodes a model picks
    (popular nodes tend to be large); the evaluator reports it."""
    _check_fraction(fraction)
    n_nodes = taxonomy.n_nodes(level)
    return int(min(n_nodes, max(1, round(fraction * n_nodes))))


def adaptive_node_mask(level_scores: torch.Tensor, leaf_counts: torch.Tensor | np.ndarray,
                       fraction: float) -> torch.Tensor:
    """Per row, take nodes in descending score until the leaves under the taken nodes reach
    `fraction` of all leaves (the node that crosses the target is included, so at least one node
    is always taken). level_scores [M, n_nodes], leaf_counts [n_nodes] -> bool [M, n_nodes]."""
    _check_fraction(fraction)
    counts = torch.as_tensor(leaf_counts, dtype=torch.float64, device=level_scores.device)
    if counts.shape != (level_scores.shape[1],):
        raise ValueError(f"leaf_counts has shape {tuple(counts.shape)}, expected ({level_scores.shape[1]},)")
    order = _descending_order(level_scores)
    sorted_counts = counts[order]
    before = torch.cumsum(sorted_counts, dim=1) - sorted_counts  # leaves taken before each node
    target = fraction * float(counts.sum())
    keep_sorted = before < target
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def adaptive_nodes(level_scores: torch.Tensor, leaf_counts: torch.Tensor | np.ndarray,
                   fraction: float, *, first_guess: int = 64) -> torch.Tensor:
    """The nodes of `adaptive_node_mask` as indices [M, w], best first (-1: padding to the longest
    row w). The taken nodes are a prefix of the descending order, so the best `first_guess` nodes
    (re-sorted, ties by lower index) replace the full sort whenever every row's prefix ends inside
    them strictly above the guess's lowest score (else the next guess is 4 times larger, up to a
    sort). In NumPy: a server calls this per batch on a few rows, where each torch operation's
    fixed cost outweighs its work."""
    _check_fraction(fraction)
    scores = level_scores.detach().float().cpu().numpy()
    counts = np.asarray(leaf_counts.cpu() if isinstance(leaf_counts, torch.Tensor) else leaf_counts, dtype=np.float64)
    n_nodes = scores.shape[1]
    if counts.shape != (n_nodes,):
        raise ValueError(f"leaf_counts has shape {tuple(counts.shape)}, expected ({n_nodes},)")
    target = fraction * float(counts.sum())
    negated = -scores                  # ascending stable order of -score: descending, ties by lower index
    guess = min(n_nodes, max(1, first_guess))
    while True:
        if guess >= n_nodes:
            order = np.argsort(negated, axis=1, kind="stable")
        else:
            top = np.sort(np.argpartition(negated, guess - 1, axis=1)[:, :guess], axis=1)
            order = np.take_along_axis(top, np.argsort(np.take_along_axis(negated, top, 1), axis=1, kind="stable"), 1)
        sorted_counts = counts[order]
        keep = np.cumsum(sorted_counts, axis=1) - sorted_counts < target    # leaves taken before each node
        keep[:, 0] = True
        taken = keep.sum(1)
        if guess < n_nodes:
            # complete only if each row stopped before the guess's end, strictly above its last score
            # (a node outside the guess that ties with the last taken one could precede it)
            last = np.take_along_axis(negated, np.take_along_axis(order, (taken - 1)[:, None], 1), 1)[:, 0]
            lowest = np.take_along_axis(negated, order[:, -1:], 1)[:, 0]
            if not ((taken < guess) & (last < lowest)).all():
                guess *= 4
                continue
        width = int(taken.max())
        nodes = np.where(keep[:, :width], order[:, :width], -1)
        return torch.from_numpy(nodes).to(level_scores.device)


def node_mask_from_indices(nodes: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """nodes [M, k] -> bool [M, n_nodes]."""
    mask = torch.zeros(nodes.shape[0], n_nodes, dtype=torch.bool, device=nodes.device)
    return mask.scatter_(1, nodes.long(), True)


def leaf_mask_from_nodes(node_mask: torch.Tensor, taxonomy: Taxonomy, level: int | str) -> torch.Tensor:
    """bool [M, n_nodes(level)] -> bool [M, n_leaves]: a leaf is kept when its ancestor is. One gather."""
    table = torch.from_numpy(taxonomy.ancestor_table(level)).to(node_mask.device)
    return node_mask[:, table]


def descendant_mask(node_mask: torch.Tensor, taxonomy: Taxonomy, level: int | str,
                    finer_level: int | str) -> torch.Tensor:
    """bool [M, n_nodes(level)] -> bool [M, n_nodes(finer_level)]: nodes of the finer level whose
    ancestor at `level` is kept."""
    coarse, fine = taxonomy.level_index(level), taxonomy.level_index(finer_level)
    if fine < coarse:
        raise ValueError(f"{taxonomy.level_names[fine]!r} is coarser than {taxonomy.level_names[coarse]!r}")
    ancestors = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(fine)), fine, coarse)
    return node_mask[:, torch.from_numpy(ancestors).to(node_mask.device)]


def candidate_node_mask(level_scores: torch.Tensor, taxonomy: Taxonomy, level: int | str, *,
                        mode: CandidateMode = "adaptive", k: int | None = None,
                        fraction: float | None = None,
                        leaf_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The chosen nodes of `level` per row, as bool [M, n_nodes(level)].
    mode "fixed_k": the top k nodes (k given, or from `fraction` through `k_for_fraction`);
    mode "adaptive": nodes until their leaves reach `fraction` of the catalogue (`leaf_counts`,
    the leaves under each node, may be passed to save recounting them on every call)."""
    n_nodes = taxonomy.n_nodes(level)
    if level_scores.ndim != 2 or level_scores.shape[1] != n_nodes:
        raise ValueError(f"level scores of shape {tuple(level_scores.shape)} for level "
                         f"{taxonomy.level_names[taxonomy.level_index(level)]!r} with {n_nodes} nodes")
    if mode == "fixed_k":
        if k is None:
            if fraction is None:
                raise ValueError("fixed_k candidates need k or fraction")
            k = k_for_fraction(taxonomy, level, fraction)
        return node_mask_from_indices(top_nodes(level_scores, k), n_nodes)
    if mode == "adaptive":
        if fraction is None:
            raise ValueError("adaptive candidates need a fraction")
        if k is not None:
            raise ValueError("adaptive candidates take a fraction, not k")
        if leaf_counts is None:
            leaf_counts = torch.from_numpy(taxonomy.leaf_counts(level)).to(level_scores.device)
        return adaptive_node_mask(level_scores, leaf_counts, fraction)
    raise ValueError(f"unknown candidate mode {mode!r}; use 'fixed_k' or 'adaptive'")


def candidate_leaf_mask(level_scores: torch.Tensor, taxonomy: Taxonomy, level: int | str, *,
                        mode: CandidateMode = "adaptive", k: int | None = None,
                        fraction: float | None = None) -> torch.Tensor:
    """bool [M, n_leaves]: the leaves under each row's chosen nodes of `level` (see
    `candidate_node_mask`)."""
    node_mask = candidate_node_mask(level_scores, taxonomy, level, mode=mode, k=k, fraction=fraction)
    return leaf_mask_from_nodes(node_mask, taxonomy, level)


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"candidate fraction must be in (0, 1], got {fraction}")


# ---- level scores from leaf scores ---------------------------------------------------------------

def aggregate_leaf_scores(leaf_scores: torch.Tensor, taxonomy: Taxonomy, level: int | str,
                          how: Literal["logsumexp", "max"] = "logsumexp") -> torch.Tensor:
    """Scores of the nodes of `level` from leaf scores [M, n_leaves], for models without a head at
    that level. "logsumexp" reads leaf scores as logits: a node's score is the log of the summed
    softmax probability of its leaves (up to a per-row constant, which never changes a ranking).
    "max" scores a node by its best leaf, which suits scores that are not logits (counts,
    similarities). Nodes without leaves get -inf."""
    parent = torch.from_numpy(taxonomy.ancestor_table(level)).to(leaf_scores.device)
    return aggregate_node_scores(leaf_scores, parent, taxonomy.n_nodes(level), how)


def aggregate_node_scores(scores: torch.Tensor, parent: torch.Tensor, n_parents: int,
                          how: Literal["logsumexp", "max"] = "logsumexp") -> torch.Tensor:
    """scores [M, n] of fine nodes, parent [n] (index of each fine node's coarse ancestor) ->
    scores [M, n_parents] of the coarse nodes (see `aggregate_leaf_scores`). Computed in float32,
    or float64 when the input is float64."""
    scores = scores if scores.dtype == torch.float64 else scores.float()
    index = parent.to(scores.device).expand(scores.shape[0], -1)
    if how == "max":
        out = torch.full((scores.shape[0], n_parents), -math.inf, dtype=scores.dtype, device=scores.device)
        return out.scatter_reduce_(1, index, scores, reduce="amax", include_self=True)
    if how == "logsumexp":
        row_max = scores.max(dim=1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        sums = torch.zeros(scores.shape[0], n_parents, dtype=scores.dtype, device=scores.device)
        sums.scatter_add_(1, index, torch.exp(scores - row_max))
        return torch.log(sums) + row_max
    raise ValueError(f"unknown aggregation {how!r}; use 'logsumexp' or 'max'")


# ---- scoring in bounded memory (serving and speed benchmarks) ----------------------------------

def row_chunks(n_rows: int, n_columns: int, budget_mb: float, bytes_per_cell: int = 4) -> Iterator[slice]:
    """Slices of rows such that a [rows, n_columns] block of `bytes_per_cell` stays within
    `budget_mb` (at least one row per chunk)."""
    rows = max(1, int(budget_mb * 2**20 // max(1, n_columns * bytes_per_cell)))
    for start in range(0, n_rows, rows):
        yield slice(start, min(n_rows, start + rows))


def full_topk(queries: torch.Tensor, leaf_embeddings: torch.Tensor, k: int, *,
              budget_mb: float = 256.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k leaves by dot product over the whole catalogue: queries [Q, d], leaf_embeddings
    [N, d] -> (scores [Q, k], leaves [Q, k]). Leaves are scored in column chunks so the score block
    stays within `budget_mb`, and a running top-k is merged chunk by chunk."""
    k = min(int(k), leaf_embeddings.shape[0])
    best_scores = torch.full((queries.shape[0], 0), -math.inf, dtype=queries.dtype, device=queries.device)
    best_leaves = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for chunk in row_chunks(leaf_embeddings.shape[0], max(1, queries.shape[0]), budget_mb,
                            queries.element_size()):
        scores = queries @ leaf_embeddings[chunk].T
        leaves = torch.arange(chunk.start, chunk.stop, device=queries.device).expand(queries.shape[0], -1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_leaves = torch.cat([best_leaves, leaves], dim=1)
        top = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_leaves = top.values, merged_leaves.gather(1, top.indices)
    return best_scores, best_leaves


def block_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row q's ranges [starts[q, j], starts[q, j] + lengths[q, j]) laid end to end: [Q, C] int64,
    padded with -1 to the longest row C. Whole-batch NumPy (repeat over the lengths), no loop."""
    flat = lengths.ravel()
    per_row = lengths.sum(axis=1)
    width = int(per_row.max()) if lengths.size else 0
    offset = np.arange(int(flat.sum())) - np.repeat(np.cumsum(flat) - flat, flat)   # place inside its range
    out = np.full((lengths.shape[0], width), -1, dtype=np.int64)
    out[np.arange(width) < per_row[:, None]] = np.repeat(starts.ravel(), flat) + offset   # row-major order
    return out


def _node_ranges(offsets: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) in the leaves-by-node order of each node (-1: padding, length 0)."""
    valid = nodes >= 0
    safe = np.where(valid, nodes, 0)
    starts = offsets[safe]
    return starts, np.where(valid, offsets[safe + 1] - starts, 0)


def candidate_leaf_index(taxonomy: Taxonomy, level: int | str, nodes: torch.Tensor) -> torch.Tensor:
    """nodes [Q, k] of `level` (-1: no node, padding) -> leaf indices [Q, C] of the leaves under each
    row's nodes, in the order of the nodes and, within a node, of `NodeBlocks` (so both list a row's
    candidates alike), padded with -1 to the largest row's count C."""
    order, offsets = taxonomy._leaves_by_node(taxonomy.level_index(level))
    positions = block_positions(*_node_ranges(offsets, nodes.cpu().numpy().astype(np.int64, copy=False)))
    leaves = order[np.maximum(positions, 0)]
    leaves[positions < 0] = -1
    return torch.from_numpy(leaves).to(nodes.device)


class NodeBlocks:
    """Leaf embeddings regrouped once so the leaves under each node of `level` are one contiguous
    block: candidate scoring then multiplies whole blocks instead of gathering one vector per
    candidate (the gather copied Q × C × d floats and was slower than full scoring at 5%)."""

    def __init__(self, leaf_embeddings: torch.Tensor, taxonomy: Taxonomy, level: int | str):
        level = taxonomy.level_index(level)
        order, offsets = taxonomy._leaves_by_node(level)
        self.leaf_ids = torch.from_numpy(order).to(leaf_embeddings.device)            # block position -> leaf
        self.offsets = offsets                                                        # node -> block range
        self.source = leaf_embeddings
        self._rows: torch.Tensor | None = None
        self._columns: np.ndarray | None = None

    # each layout is built on first use: a server that scores through the kernels never copies the
    # table row-major (260 MB at a million items of 65 floats)
    @property
    def embeddings(self) -> torch.Tensor:
        """[N, d]: the leaf vectors, grouped by node."""
        if self._rows is None:
            self._rows = self.source.index_select(0, self.leaf_ids).contiguous()
        return self._rows

    @property
    def columns(self) -> np.ndarray:
        """[d, N] float32: the leaf vectors column-major, grouped by node (what `kernels.score_nodes` reads)."""
        if self._columns is None:
            self._columns = np.ascontiguousarray(self.source.T.float().cpu().numpy()[:, self.leaf_ids.cpu().numpy()])
        return self._columns

    def candidate_count(self, nodes: torch.Tensor) -> int:
        """How many leaves lie under the chosen nodes, summed over the rows."""
        chosen = nodes.cpu().numpy()
        chosen = chosen[chosen >= 0]
        return int((self.offsets[chosen + 1] - self.offsets[chosen]).sum())

    def union_size(self, nodes: torch.Tensor) -> int:
        """How many leaves lie under the nodes chosen by any row."""
        chosen = nodes.cpu().numpy()
        union = np.unique(chosen[chosen >= 0])
        return int((self.offsets[union + 1] - self.offsets[union]).sum())

    def union_scores(self, queries: torch.Tensor, nodes: torch.Tensor, score_rows=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `scores` (same candidates, same order), in one product: the blocks of every node any
        row chose are copied side by side once, all queries are multiplied with them, and each row
        picks its own columns. `score_rows(queries, block positions [U]) -> [Q, U]` may replace the
        product (ONNX Runtime does)."""
        chosen = nodes.cpu().numpy().astype(np.int64, copy=False)     # index arithmetic in NumPy (cheaper)
        union = np.unique(chosen[chosen >= 0])
        union_starts, union_lengths = _node_ranges(self.offsets, union)
        rows = block_positions(union_starts[None], union_lengths[None])[0]           # [U] block positions
        union_leaves = self.leaf_ids.numpy()[rows]
        if score_rows is None:
            product = queries @ self.embeddings.index_select(0, torch.from_numpy(rows)).T   # [Q, U]
        else:
            product = score_rows(queries, torch.from_numpy(union_leaves))
        where = np.zeros(len(self.offsets), dtype=np.int64)          # node -> its first column in the union
        where[union] = np.cumsum(union_lengths) - union_lengths
        _, lengths = _node_ranges(self.offsets, chosen)
        columns = block_positions(np.where(chosen >= 0, where[np.maximum(chosen, 0)], 0), lengths)
        padding = columns < 0
        columns[padding] = 0
        scores = product.gather(1, torch.from_numpy(columns)).masked_fill_(torch.from_numpy(padding), -math.inf)
        leaves = union_leaves[columns]
        leaves[padding] = -1
        return scores, torch.from_numpy(leaves)

    def topk(self, queries: torch.Tensor, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k leaves among those under `nodes` [Q, k_nodes], per query: (scores [Q, k], leaves
        [Q, k]); rows with fewer than k candidates are padded with score -inf and leaf -1."""
        scores, leaves = self.scores(queries, nodes)
        top = torch.topk(scores, min(int(k), scores.shape[1]), dim=1)
        return top.values, leaves.gather(1, top.indices)

    def scores(self, queries: torch.Tensor, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every candidate's score: (scores [Q, C], leaves [Q, C]) over the leaves under each row's
        `nodes` [Q, k_nodes] (-1: no node, padding), padded with score -inf and leaf -1 to the
        largest row's count C."""
        n_queries = queries.shape[0]
        chosen = nodes.long().cpu().numpy()
        lengths = np.where(chosen >= 0, self.offsets[chosen + 1] - self.offsets[chosen], 0)  # [Q, k_nodes]
        # column where each (query, chosen node) block starts in that query's candidate row
        columns = np.cumsum(lengths, axis=1) - lengths
        width = int(lengths.sum(1).max()) if n_queries else 0
        scores = torch.full((n_queries, width), -math.inf, dtype=queries.dtype, device=queries.device)
        positions = torch.full((n_queries, width), -1, dtype=torch.long, device=queries.device)
        flat_nodes = chosen.reshape(-1)
        order = np.argsort(flat_nodes, kind="stable")
        boundaries = np.flatnonzero(np.diff(flat_nodes[order])) + 1
        # one matrix product per distinct node, against every query that chose it
        for group in np.split(order, boundaries) if len(order) else []:
            node = int(flat_nodes[group[0]])
            start, stop = (int(self.offsets[node]), int(self.offsets[node + 1])) if node >= 0 else (0, 0)
            if stop == start:
                continue
            rows_np = group // chosen.shape[1]
            rows = torch.from_numpy(rows_np).to(queries.device)
            block_scores = queries.index_select(0, rows) @ self.embeddings[start:stop].T   # [|rows|, L]
            cols = torch.from_numpy(columns.reshape(-1)[group]).to(queries.device)[:, None] \
                + torch.arange(stop - start, device=queries.device)
            scores[rows[:, None], cols] = block_scores
            positions[rows[:, None], cols] = torch.arange(start, stop, device=queries.device)
        leaves = torch.where(positions >= 0, self.leaf_ids[positions.clamp(min=0)], torch.full_like(positions, -1))
        return scores, leaves


def candidate_topk(queries: torch.Tensor, leaf_embeddings: torch.Tensor, taxonomy: Taxonomy,
                   level: int | str, nodes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k leaves by dot product among the leaves under `nodes` [Q, k_nodes] only. Regroups the
    embeddings on every call: a server keeps one `NodeBlocks` and calls its `topk` instead."""
    return NodeBlocks(leaf_embeddings, taxonomy, level).topk(queries, nodes, k)
