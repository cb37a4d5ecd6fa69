"""Compiled candidate kernels for serving (Numba): choosing each query's nodes and scoring the
leaves under them, one compiled call per stage instead of a dozen array operations per batch.

At serving sizes (a few to a few dozen queries per batch, a few thousand candidates each) the
NumPy / torch way (`adaptive_nodes`, `NodeBlocks.union_scores`) spends most of its time on the fixed
cost of each operation and on copying the rows of the chosen nodes. These kernels give the same
answers (same nodes in the same order, the same candidates in the same order; scores equal up to
float rounding) by walking each query's own nodes:

- `select_nodes`: per row, the best nodes (descending score, ties by the lower index: the order of
  `top_nodes` and `adaptive_nodes`), either a fixed number or until their leaves reach a target
  count. A bounded insertion buffer holds the best `guess` nodes; a row that needs more is sorted
  whole.
- `score_nodes`: per row, the dot products of its query with the leaves under its nodes, read from
  the item table stored column-major and grouped by node (`NodeBlocks.columns`), so the inner loop
  runs along contiguous leaves (vectorised without reassociating any sum).

Both release the interpreter lock, so the event loop keeps reading requests while a batch is
scored. Numba compiles them on first use and caches the machine code beside this file (or in the
user's cache folder when the package folder is read-only); `warm_up` does it at server start.
Without Numba (`available()` False) the scorer falls back to the NumPy / torch way.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:          # an optional speed-up: every caller has a NumPy / torch way
    numba = None

GUESS = 64   # nodes held per row before a full sort (rows at 5% of Diginetica take 3-30)


def available() -> bool:
    return numba is not None


def _compile(function):
    return numba.njit(cache=True, nogil=True)(function) if numba is not None else function


@_compile
def _select_nodes(scores, leaf_counts, target, top, guess):
    n_rows, n_nodes = scores.shape
    held = min(n_nodes, max(guess, top))
    chosen = np.full((n_rows, held), -1, np.int64)
    taken = np.zeros(n_rows, np.int64)
    best_nodes = np.empty(held, np.int64)
    best_scores = np.empty(held, scores.dtype)
    unsorted_rows = []
    for row in range(n_rows):
        values = scores[row]
        filled = 0
        for node in range(n_nodes):
            value = values[node]
            if filled == held and not value > best_scores[held - 1]:
                continue
            # after every held node that scores at least as high: ties keep the lower index first
            place = filled if filled < held else held - 1
            while place > 0 and value > best_scores[place - 1]:
                if place < held:
                    best_scores[place] = best_scores[place - 1]
                    best_nodes[place] = best_nodes[place - 1]
                place -= 1
            best_scores[place] = value
            best_nodes[place] = node
            if filled < held:
                filled += 1
        count, leaves = 0, 0.0
        while count < filled:
            if top > 0:
                if count >= top:
                    break
            elif count > 0 and leaves >= target:
                break
            chosen[row, count] = best_nodes[count]
            leaves += leaf_counts[best_nodes[count]]
            count += 1
        if top <= 0 and count == filled and filled < n_nodes and leaves < target:
            unsorted_rows.append(row)
        taken[row] = count
    if n_rows == 0:
        return chosen[:, :0].copy()
    if len(unsorted_rows) == 0:
        return chosen[:, :taken.max()].copy()
    wide = np.full((n_rows, n_nodes), -1, np.int64)
    wide[:, :held] = chosen
    for row in unsorted_rows:
        order = np.argsort(-scores[row], kind="mergesort")    # stable: ties by the lower index
        count, leaves = 0, 0.0
        while count < n_nodes and (count == 0 or leaves < target):
            wide[row, count] = order[count]
            leaves += leaf_counts[order[count]]
            count += 1
        taken[row] = count
    return wide[:, :taken.max()].copy()


@_compile
def _score_nodes(queries, nodes, offsets, columns, leaf_ids):
    n_rows, dim = queries.shape
    widths = np.zeros(n_rows, np.int64)
    for row in range(n_rows):
        for slot in range(nodes.shape[1]):
            node = nodes[row, slot]
            if node >= 0:
                widths[row] += offsets[node + 1] - offsets[node]
    width = widths.max() if n_rows else 0
    scores = np.full((n_rows, width), -np.inf, np.float32)
    ids = np.full((n_rows, width), -1, np.int64)
    for row in range(n_rows):
        query = queries[row]
        at = 0
        for slot in range(nodes.shape[1]):
            node = nodes[row, slot]
            if node < 0:
                continue
            start, stop = offsets[node], offsets[node + 1]
            size = stop - start
            out = scores[row, at:at + size]
            out[:] = 0.0
            d = 0
            while d + 4 <= dim:   # four dimensions per pass: a quarter of the reads and writes of `out`
                q0, q1, q2, q3 = query[d], query[d + 1], query[d + 2], query[d + 3]
                c0, c1 = columns[d, start:stop], columns[d + 1, start:stop]
                c2, c3 = columns[d + 2, start:stop], columns[d + 3, start:stop]
                for j in range(size):
                    out[j] += q0 * c0[j] + q1 * c1[j] + q2 * c2[j] + q3 * c3[j]
                d += 4
            while d < dim:
                q0, c0 = query[d], columns[d, start:stop]
                for j in range(size):
                    out[j] += q0 * c0[j]
                d += 1
            ids[row, at:at + size] = leaf_ids[start:stop]
            at += size
    return scores, ids


def select_nodes(scores: np.ndarray, leaf_counts: np.ndarray, *, top: int | None = None,
                 target: float | None = None) -> np.ndarray:
    """scores [Q, n_nodes] -> chosen nodes [Q, w] best first, -1 padding to the longest row: each
    row's `top` best nodes, or its best nodes until the leaves under the nodes taken before reach
    `target` (the node that crosses it is taken; at least one node). The nodes of `top_nodes` and
    `adaptive_nodes`, in their order."""
    if (top is None) == (target is None):
        raise ValueError("give top or target")
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    return _select_nodes(np.ascontiguousarray(scores, dtype=np.float32),
                         np.ascontiguousarray(leaf_counts, dtype=np.float64),
                         float(target or 0.0), int(top or 0), GUESS)


def score_nodes(queries: np.ndarray, nodes: np.ndarray, offsets: np.ndarray, columns: np.ndarray,
                leaf_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D], nodes [Q, w] (-1 padding), the leaves grouped by node (`offsets` [n + 1],
    `columns` [D, N] in that order, `leaf_ids` [N]: block position -> leaf) -> (scores [Q, C],
    leaf ids [Q, C]): each row's candidates node by node, padded with -inf / -1 to the longest row."""
    return _score_nodes(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(nodes, dtype=np.int64),
                        offsets, columns, leaf_ids)


def warm_up() -> None:
    """Compile (or load from the cache) both kernels now, not on the first request."""
    if numba is None:
        return
    scores = np.array([[0.5, 1.0, 0.5]], dtype=np.float32)
    nodes = select_nodes(scores, np.ones(3), target=1.0)
    select_nodes(scores, np.ones(3), top=2)
    score_nodes(np.ones((1, 2), np.float32), nodes, np.arange(4, dtype=np.int64),
                np.ones((2, 3), np.float32), np.arange(3, dtype=np.int64))
