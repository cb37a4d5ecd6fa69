"""A tree of N >= 2 levels, coarse to fine. The finest level's nodes are the leaves that sequences
are made of (items, or e.g. cities when prediction stops there).

Every query is answered with arrays, so candidate generation is one vectorised gather.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from hmtrec.errors import DataError


EmptyPaths = Literal["unassigned", "drop", "error"]
ShortPaths = Literal["item", "node"]
UNASSIGNED = "(unassigned)"
PATH_JOIN = " > "


def split_paths(paths: Sequence, separator: str, *, file: str | None = None, column: str | None = None
                ) -> pd.DataFrame:
    """Path strings -> one column per level (None past a path's end; an empty path is all None)."""
    split = [[part.strip() for part in str(path).split(separator)]
             if isinstance(path, str) and path.strip() != "" else [] for path in paths]
    depth = max((len(parts) for parts in split), default=0)
    table = [parts + [None] * (depth - len(parts)) for parts in split]
    frame = pd.DataFrame(table, columns=[f"level{i + 1}" for i in range(depth)], dtype=object)
    return frame.mask(frame == "")


def _rows_error(message: str, positions: np.ndarray, leaves: np.ndarray, *, file: str | None,
                column: str | None, row_numbers: np.ndarray) -> DataError:
    listed = ", ".join(f"row {row_numbers[p]} (item {leaves[p]!r})" for p in positions[:10])
    more = f", and {len(positions) - 10:,} more" if len(positions) > 10 else ""
    count = f"; {len(positions):,} rows in all: {listed}{more}" if len(positions) > 1 else f" (item {leaves[positions[0]]!r})"
    return DataError(message + count, file=file, row=int(row_numbers[positions[0]]), column=column)


class Taxonomy:
    def __init__(self, level_names: Sequence[str], node_labels: Sequence[Sequence[str]],
                 parents: Sequence[np.ndarray | None]):
        """`node_labels[l][i]` is the original id of node i at level l; `parents[l][i]` is the index
        of its parent at level l-1 (`parents[0]` is None)."""
        if len(level_names) < 2:
            raise ValueError("a Taxonomy needs at least 2 levels")
        if len(set(level_names)) != len(level_names):
            raise ValueError(f"level names must be distinct: {list(level_names)}")
        self.level_names = list(level_names)
        self.node_labels = [np.asarray(labels, dtype=object) for labels in node_labels]
        self.parents: list[np.ndarray | None] = [None] + [np.asarray(p, dtype=np.int64) for p in parents[1:]]
        for level in range(1, self.n_levels):
            parent = self.parents[level]
            if len(parent) != len(self.node_labels[level]):
                raise ValueError(f"level {self.level_names[level]}: {len(parent)} parents for "
                                 f"{len(self.node_labels[level])} nodes")
            if len(parent) and (parent.min() < 0 or parent.max() >= self.n_nodes(level - 1)):
                raise ValueError(f"level {self.level_names[level]}: parent index out of range")
        # leaf_ancestors[:, l] is each leaf's node at level l; the last column is the leaf itself.
        ancestors = np.empty((self.n_leaves, self.n_levels), dtype=np.int64)
        ancestors[:, -1] = np.arange(self.n_leaves)
        for level in range(self.n_levels - 1, 0, -1):
            ancestors[:, level - 1] = self.parents[level][ancestors[:, level]]
        self.leaf_ancestors = ancestors
        self._label_index: list[dict[str, int] | None] = [None] * self.n_levels
        self._sorted_leaves: list[tuple[np.ndarray, np.ndarray] | None] = [None] * self.n_levels

    # ---- sizes and names -------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    @property
    def n_leaves(self) -> int:
        return len(self.node_labels[-1])

    @property
    def leaf_level(self) -> str:
        return self.level_names[-1]

    def n_nodes(self, level: int | str) -> int:
        return len(self.node_labels[self.level_index(level)])

    def level_index(self, level: int | str) -> int:
        if isinstance(level, str):
            if level not in self.level_names:
                raise KeyError(f"unknown taxonomy level {level!r}; levels are {self.level_names}")
            return self.level_names.index(level)
        if not -self.n_levels <= level < self.n_levels:
            raise KeyError(f"level {level} out of range for {self.n_levels} levels")
        return level % self.n_levels

    # ---- label <-> index -------------------------------------------------------------------
    def index_of(self, labels: Sequence, level: int | str = -1) -> np.ndarray:
        """Node indices of original labels; an unknown label raises KeyError naming it."""
        level = self.level_index(level)
        if self._label_index[level] is None:
            self._label_index[level] = {str(label): i for i, label in enumerate(self.node_labels[level])}
        lookup = self._label_index[level]
        out = np.empty(len(labels), dtype=np.int64)
        for position, label in enumerate(labels):
            index = lookup.get(str(label))
            if index is None:
                raise KeyError(f"unknown {self.level_names[level]} {label!r}")
            out[position] = index
        return out

    def labels_of(self, nodes, level: int | str = -1) -> np.ndarray:
        return self.node_labels[self.level_index(level)][np.asarray(nodes, dtype=np.int64)]

    # ---- tree queries ----------------------------------------------------------------------
    def ancestors(self, leaves, level: int | str):
        """Node at `level` of each leaf; accepts numpy arrays or torch tensors of any shape."""
        column = self.level_index(level)
        if isinstance(leaves, torch.Tensor):
            table = torch.from_numpy(self.leaf_ancestors[:, column]).to(leaves.device)
            return table[leaves]
        return self.leaf_ancestors[np.asarray(leaves, dtype=np.int64), column]

    def ancestor_table(self, level: int | str) -> np.ndarray:
        """For each leaf, its node at `level` (a view, length n_leaves)."""
        return self.leaf_ancestors[:, self.level_index(level)]

    def node_ancestors(self, nodes, level: int | str, to_level: int | str) -> np.ndarray:
        """Map nodes at `level` to their ancestors at the coarser `to_level`."""
        level, to_level = self.level_index(level), self.level_index(to_level)
        if to_level > level:
            raise ValueError("to_level must be coarser than level")
        nodes = np.asarray(nodes, dtype=np.int64)
        for current in range(level, to_level, -1):
            nodes = self.parents[current][nodes]
        return nodes

    def leaves_under(self, nodes, level: int | str) -> np.ndarray:
        """All leaves under any of `nodes` at `level`, sorted by leaf index."""
        level = self.level_index(level)
        order, offsets = self._leaves_by_node(level)
        nodes = np.unique(np.asarray(nodes, dtype=np.int64))
        starts, ends = offsets[nodes], offsets[nodes + 1]
        lengths = ends - starts
        if lengths.sum() == 0:
            return np.empty(0, dtype=np.int64)
        # Vectorised concatenation of the ranges [start, end) for every node.
        positions = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
        return np.sort(order[positions])

    def leaf_counts(self, level: int | str) -> np.ndarray:
        """Number of leaves under each node of `level`."""
        level = self.level_index(level)
        return np.bincount(self.leaf_ancestors[:, level], minlength=self.n_nodes(level))

    def candidate_mask(self, nodes: torch.Tensor, level: int | str) -> torch.Tensor:
        """nodes [Q, k] at `level` -> bool [Q, n_leaves], True for leaves under any of a row's nodes.
        One scatter and one gather: no loop over queries or leaves."""
        level = self.level_index(level)
        n_queries = nodes.shape[0]
        node_mask = torch.zeros(n_queries, self.n_nodes(level), dtype=torch.bool, device=nodes.device)
        node_mask.scatter_(1, nodes.long(), True)
        table = torch.from_numpy(self.leaf_ancestors[:, level]).to(nodes.device)
        return node_mask[:, table]

    def _leaves_by_node(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted_leaves[level] is None:
            column = self.leaf_ancestors[:, level]
            order = np.argsort(column, kind="stable")
            offsets = np.zeros(self.n_nodes(level) + 1, dtype=np.int64)
            np.cumsum(np.bincount(column, minlength=self.n_nodes(level)), out=offsets[1:])
            self._sorted_leaves[level] = (order, offsets)
        return self._sorted_leaves[level]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: pd.DataFrame, level_columns: Sequence[str], *,
                   file: str | None = None, row_offset: int = 1) -> "Taxonomy":
        """Build from a table with one column per level, coarse to fine; the last column holds the
        leaves. Raises DataError (file, row, column) for a missing node, a leaf listed twice with
        different paths, or a node with two parents. Rows repeating the same path are merged."""
        level_columns = list(level_columns)
        if len(level_columns) < 2:
            raise DataError(f"a taxonomy needs at least 2 level columns, got {level_columns}", file=file)
        for column in level_columns:
            if column not in table.columns:
                raise DataError(f"missing taxonomy column; columns are {list(table.columns)}",
                                file=file, column=column)
        frame = table[level_columns]
        for column in level_columns:
            values = frame[column]
            missing = values.isna() | (values.astype(str).str.strip() == "")
            if missing.any():
                row = int(np.flatnonzero(missing.to_numpy())[0]) + row_offset
                what = "item without a taxonomy node" if column != level_columns[-1] else "missing id"
                raise DataError(what, file=file, row=row, column=column)
        frame = frame.astype(str)
        node_labels: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        for column in level_columns:
            uniques, inverse = np.unique(frame[column].to_numpy(), return_inverse=True)
            node_labels.append(uniques)
            codes.append(inverse.astype(np.int64))
        parents: list[np.ndarray | None] = [None]
        for level in range(1, len(level_columns)):
            child, parent = codes[level], codes[level - 1]
            first_parent = np.full(len(node_labels[level]), -1, dtype=np.int64)
            first_row = np.full(len(node_labels[level]), -1, dtype=np.int64)
            order = np.arange(len(child))[::-1]  # later rows first, so the first occurrence wins
            first_parent[child[order]] = parent[order]
            first_row[child[order]] = order
            conflict = first_parent[child] != parent
            if conflict.any():
                row = int(np.flatnonzero(conflict)[0])
                node = node_labels[level][child[row]]
                kind = "item" if level == len(level_columns) - 1 else "node"
                raise DataError(
                    f"{kind} {node!r} is mapped to two parents: "
                    f"{node_labels[level - 1][first_parent[child[row]]]!r} "
                    f"(row {int(first_row[child[row]]) + row_offset}) and "
                    f"{node_labels[level - 1][parent[row]]!r}",
                    file=file, row=row + row_offset, column=level_columns[level - 1])
            parents.append(first_parent)
        return cls(level_columns, node_labels, parents)

    @classmethod
    def from_paths(cls, leaves: Sequence, paths: Sequence[str], level_names: Sequence[str] | None = None,
                   *, separator: str = ">", file: str | None = None, column: str = "path",
                   empty_paths: EmptyPaths = "unassigned", short_paths: ShortPaths = "item") -> "Taxonomy":
        """Build from one path column such as "Home > Kitchen > Knives" per leaf (see `from_levels`
        for ragged paths). Node labels are the full paths, so equal names under different parents
        stay distinct nodes."""
        parts = split_paths(paths, separator, file=file, column=column)
        taxonomy, _ = cls.from_levels(np.asarray([str(leaf) for leaf in leaves], dtype=object), parts, level_names,
                                      file=file, column=column, empty_paths=empty_paths, short_paths=short_paths)
        return taxonomy

    @classmethod
    def from_levels(cls, leaves: np.ndarray, parts: pd.DataFrame, level_names: Sequence[str] | None = None, *,
                    file: str | None = None, column: str | None = None, empty_paths: EmptyPaths = "unassigned",
                    short_paths: ShortPaths = "item", row_numbers: np.ndarray | None = None
                    ) -> tuple["Taxonomy", np.ndarray]:
        """A taxonomy from ragged paths: `parts` holds one column per level (coarse to fine), a node
        name or None, one row per leaf. Returns the taxonomy and a mask of the leaves kept.

        One keying rule for every input form: a node is its full path, labelled "A > B > C".
        - A path shorter than the deepest (variable depth, or an item attached to an internal node)
          is extended to the full depth: `short_paths="item"` gives the item a node of its own at
          each missing level ("A > B > [item 17]"), `"node"` one shared node per internal node
          ("A > B > (B)").
        - An empty path: `"unassigned"` puts the item under an "(unassigned)" node at every level,
          `"drop"` leaves it out (the mask says which), `"error"` names every such row.
        - A gap (a level missing between two present ones) names every such row.
        `row_numbers` are the rows named in errors (default 1, 2, ...)."""
        leaves = np.asarray(leaves, dtype=object)
        row_numbers = np.arange(1, len(leaves) + 1) if row_numbers is None else np.asarray(row_numbers)
        present = parts.notna().to_numpy()
        if present.shape[1] == 0:
            present = np.zeros((len(leaves), 1), dtype=bool)
            parts = pd.DataFrame({"level1": [None] * len(leaves)})
        gap = (~present[:, :-1] & present[:, 1:]).any(axis=1)
        if gap.any():
            raise _rows_error("a path level is empty between two non-empty ones", np.flatnonzero(gap), leaves,
                              file=file, column=column, row_numbers=row_numbers)
        empty = ~present[:, 0]
        keep = np.ones(len(leaves), dtype=bool)
        if empty.any():
            if empty_paths == "error":
                raise _rows_error("item without a taxonomy path (item_columns.empty_paths: unassigned or drop "
                                  "accepts it)", np.flatnonzero(empty), leaves, file=file, column=column,
                                  row_numbers=row_numbers)
            if empty_paths == "drop":
                keep = ~empty
            else:
                parts = parts.copy()
                parts.iloc[np.flatnonzero(empty), :] = UNASSIGNED
                present = parts.notna().to_numpy()
        parts, leaves, present = parts[keep], leaves[keep], present[keep]
        depth = int(present.sum(axis=1).max()) if len(leaves) else 1
        names = list(level_names) if level_names else [f"level{i + 1}" for i in range(depth)] + ["item"]
        if len(names) != depth + 1:
            raise DataError(f"{len(names)} level names for paths of depth {depth} plus the item", file=file,
                            column=column)
        rows: dict[str, np.ndarray] = {}
        leaf_names = pd.Series(leaves, dtype=object).astype(str)
        label = last_name = None
        for level in range(depth):
            values = parts.iloc[:, level].reset_index(drop=True)
            here = present[:, level]
            if level == 0:    # every remaining path has a first level
                label = last_name = values.astype(str)
            else:
                above = present[:, level - 1]
                pad_node = ("[item " + leaf_names + "]") if short_paths == "item" else ("(" + last_name + ")")
                label = pd.Series(np.where(here, label + PATH_JOIN + values.fillna("").astype(str),
                                           np.where(above, label + PATH_JOIN + pad_node, label)), dtype=object)
                last_name = pd.Series(np.where(here, values.fillna("").astype(str), last_name), dtype=object)
            rows[names[level]] = label.to_numpy(dtype=object)
        rows[names[-1]] = leaves.astype(str)
        return cls.from_table(pd.DataFrame(rows), names, file=file), keep

    def subset(self, leaves) -> tuple["Taxonomy", np.ndarray]:
        """The sub-tree spanned by `leaves` (indices): nodes without a kept leaf disappear.
        Returns the new taxonomy and `new_index` (length n_leaves, -1 for dropped leaves), mapping
        old leaf indices to new ones. Kept nodes keep their relative order at every level."""
        keep = np.zeros(self.n_leaves, dtype=bool)
        keep[np.asarray(leaves, dtype=np.int64)] = True
        labels, parents, new_index = [], [None], None
        for level in range(self.n_levels):
            used = np.zeros(self.n_nodes(level), dtype=bool)
            used[self.leaf_ancestors[keep, level]] = True
            index = np.full(self.n_nodes(level), -1, dtype=np.int64)
            index[used] = np.arange(int(used.sum()))
            labels.append(self.node_labels[level][used])
            if level > 0:
                parents.append(previous_index[self.parents[level][used]])
            previous_index = index
            new_index = index
        return Taxonomy(self.level_names, labels, parents), new_index

    # ---- persistence (JSON, no pickles) ----------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "level_names": self.level_names,
            "node_labels": [list(map(str, labels)) for labels in self.node_labels],
            "parents": [None] + [p.tolist() for p in self.parents[1:]],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Taxonomy":
        return cls(data["level_names"], data["node_labels"], data["parents"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={self.n_nodes(i)}" for i, name in enumerate(self.level_names))
        return f"Taxonomy({sizes})"
