"""Segments: split evaluation cases into buckets (history length, target popularity, or any integer
per case the caller supplies) so metrics can be broken down by bucket.

A `Segment` holds one bucket code per evaluation case (cases in the order of
`np.flatnonzero(data.targets())`, i.e. event order) and a label per code. Codes are 0..n_labels-1;
a case with code -1 belongs to no bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmtrec.data.sequences import SequenceData, leaf_counts


@dataclass
class Segment:
    name: str
    codes: np.ndarray          # int64 [n_targets], bucket index per target, -1 = none
    labels: list[str]          # label of each bucket code

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 1:
            raise ValueError(f"segment {self.name!r}: codes must be one-dimensional")
        if len(self.codes) and (self.codes.min() < -1 or self.codes.max() >= len(self.labels)):
            raise ValueError(f"segment {self.name!r}: codes must lie in [-1, {len(self.labels) - 1}]")


def bucket_labels(edges: list[int]) -> list[str]:
    """Labels for integer buckets with lower bounds `edges`: [1, 2, 4, 8, 16] ->
    ["1", "2-3", "4-7", "8-15", "16+"]."""
    labels = []
    for position, low in enumerate(edges):
        if position + 1 == len(edges):
            labels.append(f"{low}+")
        else:
            high = edges[position + 1] - 1
            labels.append(str(low) if high == low else f"{low}-{high}")
    return labels


def check_edges(edges: list[int], what: str = "bucket edges") -> list[int]:
    edges = [int(edge) for edge in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{what} must be a non-empty, strictly increasing list, got {edges}")
    return edges


def bucketize(values: np.ndarray, edges: list[int]) -> np.ndarray:
    """Bucket code of each value: the last edge <= value; -1 below the first edge."""
    edges = check_edges(edges)
    return np.searchsorted(np.asarray(edges), np.asarray(values), side="right").astype(np.int64) - 1


def history_length_segment(data: SequenceData, edges: list[int], name: str = "history_length") -> Segment:
    """Bucket each target by the number of events before it in its sequence (its full history,
    even when the model sees only the last max_len of them)."""
    positions = data.positions()[data.targets()]
    return Segment(name, bucketize(positions, edges), bucket_labels(check_edges(edges)))


def frequency_segment(train: SequenceData, data: SequenceData, edges: list[int],
                      name: str = "target_frequency") -> Segment:
    """Bucket each target of `data` by how often its leaf occurs in `train` (edges are lower
    bounds; start them at 0 to keep leaves never seen in training, whose bucket is labelled
    "unseen")."""
    edges = check_edges(edges)
    counts = leaf_counts(train, minlength=int(data.leaves.max(initial=-1)) + 1)
    labels = bucket_labels(edges)
    if edges[0] == 0 and (len(edges) == 1 or edges[1] == 1):
        labels[0] = "unseen"
    return Segment(name, bucketize(counts[data.leaves[data.targets()]], edges), labels)


def segment_from_values(name: str, values: np.ndarray, data: SequenceData,
                        labels: list[str] | None = None) -> Segment:
    """A segment from one integer per target of `data` (or one per event, of which the targets'
    are taken). Without labels, each distinct value is its own bucket, labelled by the value."""
    values = np.asarray(values)
    n_targets, n_events = data.n_targets, data.n_events
    if values.ndim != 1 or len(values) not in (n_targets, n_events):
        raise ValueError(f"segment {name!r}: expected one value per target ({n_targets}) or per event "
                         f"({n_events}), got shape {values.shape}")
    if len(values) == n_events and n_events != n_targets:
        values = values[data.targets()]
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"segment {name!r}: values must be integers, got {values.dtype}")
    if labels is not None:
        return Segment(name, values, list(labels))
    distinct, codes = np.unique(values, return_inverse=True)
    return Segment(name, codes.astype(np.int64), [str(value) for value in distinct])
