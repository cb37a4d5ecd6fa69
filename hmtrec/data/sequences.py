"""The canonical in-memory form of interaction sequences (sessions or user histories).

Sequences are stored CSR-style: `leaves[offsets[s]:offsets[s+1]]` are the leaf indices (items, or
the finest taxonomy level) of sequence s in time order. `target_mask` marks which events are
prediction targets; every model scores all positions of a sequence in one causal pass, so no
prefix is ever re-encoded as a separate sample.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hmtrec.data.taxonomy import Taxonomy

PAD = -1  # padding value in batch tensors, for inputs and targets alike (cross_entropy ignore_index)


@dataclass
class SequenceData:
    leaves: np.ndarray                      # int64 [n_events], 0-based leaf index
    offsets: np.ndarray                     # int64 [n_sequences + 1]
    sequence_ids: np.ndarray                # original session / user ids [n_sequences]
    timestamps: np.ndarray | None = None    # float64 seconds (or order) [n_events]
    event_types: np.ndarray | None = None   # int64 index into event_type_names [n_events]
    event_type_names: list[str] = field(default_factory=list)
    target_mask: np.ndarray | None = None   # bool [n_events]; None: every event but each sequence's first

    def __post_init__(self):
        self.leaves = np.asarray(self.leaves, dtype=np.int64)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.leaves) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must start at 0, end at n_events and never decrease")
        release_mapped_pages(self.offsets)   # the check read every offset of a mapped log
        if len(self.sequence_ids) != self.n_sequences:
            raise ValueError("one sequence id per sequence expected")

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return len(self.leaves)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def positions(self) -> np.ndarray:
        """0-based position of each event within its sequence."""
        return np.arange(self.n_events) - np.repeat(self.offsets[:-1], self.lengths)

    def sequence_index(self) -> np.ndarray:
        """Sequence number of each event."""
        return np.repeat(np.arange(self.n_sequences), self.lengths)

    def targets(self) -> np.ndarray:
        """The effective target mask: the stored one, else every event except the first of each sequence."""
        if self.target_mask is not None:
            return self.target_mask
        return self.positions() > 0

    @property
    def n_targets(self) -> int:
        return int(self.targets().sum())

    def sequence(self, s: int) -> np.ndarray:
        return self.leaves[self.offsets[s]:self.offsets[s + 1]]

    def select(self, sequences: np.ndarray) -> "SequenceData":
        """A new SequenceData with the chosen sequences (indices or a boolean mask), order kept."""
        sequences = np.asarray(sequences)
        if sequences.dtype == bool:
            sequences = np.flatnonzero(sequences)
        lengths = self.lengths[sequences]
        starts = self.offsets[:-1][sequences]
        events = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return self.select_events(events, np.r_[0, np.cumsum(lengths)], self.sequence_ids[sequences])

    def select_events(self, events: np.ndarray, offsets: np.ndarray, sequence_ids: np.ndarray) -> "SequenceData":
        def pick(array):
            return None if array is None else array[events]
        return replace(self, leaves=self.leaves[events], offsets=offsets, sequence_ids=sequence_ids,
                       timestamps=pick(self.timestamps), event_types=pick(self.event_types),
                       target_mask=pick(self.target_mask))

    def keep_events(self, keep: np.ndarray) -> "SequenceData":
        """Drop events where keep is False; empty sequences vanish."""
        keep = np.asarray(keep, dtype=bool)
        kept_per_sequence = np.add.reduceat(keep.astype(np.int64), self.offsets[:-1]) if self.n_events else \
            np.zeros(self.n_sequences, dtype=np.int64)
        kept_per_sequence[self.lengths == 0] = 0
        nonempty = kept_per_sequence > 0
        offsets = np.r_[0, np.cumsum(kept_per_sequence[nonempty])]
        return self.select_events(np.flatnonzero(keep), offsets, self.sequence_ids[nonempty])

    def release_mapped_pages(self) -> None:
        """Unmap the pages of memory-mapped arrays (prepared shards) that this process has read.
        They stay in the page cache, but no longer count in its resident memory, which would
        otherwise grow to the whole log's size as random windows touch every page."""
        for array in (self.leaves, self.offsets, self.timestamps, self.event_types, self.target_mask):
            release_mapped_pages(array)

    def with_targets(self, target_mask: np.ndarray | None) -> "SequenceData":
        return replace(self, target_mask=None if target_mask is None else np.asarray(target_mask, dtype=bool))

    def last_event_only(self) -> "SequenceData":
        """Only each sequence's last event is a target (leave-one-out evaluation)."""
        mask = np.zeros(self.n_events, dtype=bool)
        mask[self.offsets[1:][self.lengths > 1] - 1] = True
        return self.with_targets(mask)


def release_mapped_pages(array: np.ndarray | None) -> None:
    """madvise(DONTNEED) on the read-only file mapping under `array`, if there is one (a no-op for
    in-memory arrays and where the platform lacks it). Read-only only: on a private writable
    mapping DONTNEED would discard the writes."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    root = None if advice is None or array is None or array.flags.writeable else _mapped_root(array)
    if root is not None and isinstance(root.base, mmap.mmap):
        root.base.madvise(advice)


def _mapped_root(array: np.ndarray) -> np.memmap | None:
    """The outermost np.memmap an array views (its data starts at the memmap's file offset; its
    base is the mapping), if any."""
    root, base = None, array
    while base is not None:
        if isinstance(base, np.memmap):
            root = base
        base = getattr(base, "base", None)
    return root


SCAN_CHUNK = 1 << 24   # events per pass of a whole-log scan: a mapped log's pages are released per pass


def leaf_counts(data: SequenceData, minlength: int = 0) -> np.ndarray:
    """Occurrences of each leaf among `data`'s events (at least `minlength` entries), counted a
    chunk at a time, so that scanning a memory-mapped log does not leave all of it resident."""
    counts = np.zeros(minlength, dtype=np.int64)
    for first in range(0, data.n_events, SCAN_CHUNK):
        chunk = np.bincount(data.leaves[first:first + SCAN_CHUNK], minlength=len(counts))
        chunk[:len(counts)] += counts
        counts = chunk
        release_mapped_pages(data.leaves)
    return counts


@dataclass
class Dataset:
    """Sequences plus the catalogue they index: a taxonomy and optional per-leaf text."""

    name: str
    sequences: SequenceData
    taxonomy: Taxonomy
    leaf_text: list[str] | None = None


@dataclass
class Windows:
    """Fixed-length windows cut from sequences for batching. Row r covers events
    `start[r] : start[r] + length[r]`; its targets are the targets inside that range."""

    start: np.ndarray
    length: np.ndarray


WINDOW_CHUNK = 1 << 20   # sequences cut per pass: the passes' temporaries are O(chunk), not O(log)


def index_dtype(largest: int, *, narrowest=np.int32) -> np.dtype:
    """The narrowest signed integer type, no narrower than `narrowest`, that holds 0..largest:
    per-window and per-sequence plans are most of training's memory that grows with the log."""
    for dtype in (np.int16, np.int32, np.int64):
        if np.dtype(dtype).itemsize >= np.dtype(narrowest).itemsize and largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{largest} does not fit in 64 bits")


def make_windows(data: SequenceData, max_len: int, *, only_with_targets: bool = True) -> Windows:
    """Cut each sequence into windows of at most `max_len` inputs, from its end backwards, so the
    most recent context is whole. A window is the events feeding predictions for its targets: it
    spans max_len + 1 events (inputs plus the last target), consecutive windows share one event.
    Sequences are cut `WINDOW_CHUNK` at a time, so that only the windows themselves grow with the
    log (at 50M events the whole-log temporaries were most of training's memory growth)."""
    targets = data.targets() if only_with_targets else None
    start_type, length_type = index_dtype(data.n_events), index_dtype(max_len + 1, narrowest=np.int16)
    starts, lengths = [], []
    for first in range(0, max(data.n_sequences, 1), WINDOW_CHUNK):
        start, length = _windows_of(data, first, min(first + WINDOW_CHUNK, data.n_sequences), max_len, targets)
        starts.append(start.astype(start_type))
        lengths.append(length.astype(length_type))
        for scanned in (data.offsets, targets):      # a mapped log's pages do not pile up pass by pass
            release_mapped_pages(scanned)
    return Windows(np.concatenate(starts), np.concatenate(lengths))


def _windows_of(data: SequenceData, first: int, last: int, max_len: int,
                targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the windows of sequences first..last-1; with `targets`, only windows
    holding at least one target."""
    seq_start, seq_len = data.offsets[first:last], np.diff(data.offsets[first:last + 1])
    span = max_len + 1
    n_windows = np.maximum(1, np.ceil(np.maximum(seq_len - 1, 1) / max_len).astype(np.int64))
    sequence = np.repeat(np.arange(last - first), n_windows)
    within = np.arange(n_windows.sum()) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    end = seq_start[sequence] + seq_len[sequence] - within * max_len  # exclusive
    start = np.maximum(seq_start[sequence], end - span)
    length = end - start
    if targets is not None:
        low, high = int(data.offsets[first]), int(data.offsets[last])   # these sequences' events
        # one cumulative count per event, written in place in the narrowest integer that holds it
        cumulative = np.zeros(high - low + 1, dtype=np.int32 if high - low < 2**31 else np.int64)
        np.cumsum(targets[low:high], out=cumulative[1:])
        # a window's targets are its events after the first (the first is context only)
        has = cumulative[start + length - low] - cumulative[start + 1 - low] > 0
        start, length = start[has], length[has]
    return start, length


# Shard arrays at least this large are read by pread per window; smaller ones through their mapping
# (faster once resident, and all of one costs at most this much memory).
PREAD_MIN_BYTES = 16 << 20


def window_values(array: np.ndarray, start: np.ndarray, length: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[windows, width] values of `array` at `index` (row r: start[r] + 0..width-1); entries at or
    past length[r] are unspecified (callers mask them). From a memory-mapped shard each window is
    read with one pread instead of through the mapping: a fault maps the whole page cache folio
    around it (up to hundreds of kB), so random windows would soon make every page of the shards
    resident in this process, and an epoch's memory would grow to the log's size."""
    source = _file_position(array)
    if source is None:
        return array[index]
    path, position = source
    out = np.zeros(index.shape, dtype=array.dtype)
    item = array.dtype.itemsize
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for row, (first, count) in enumerate(zip(start.tolist(), length.tolist())):
            if os.preadv(descriptor, [out[row, :count]], position + first * item) != count * item:
                raise OSError(f"{path}: short read of a window at element {first} (was the file truncated?)")
    finally:
        os.close(descriptor)
    return out


def _file_position(array: np.ndarray | None) -> tuple[str, int] | None:
    """(file, byte position of array[0]) when `array` is a read-only, contiguous view of a file
    mapping (np.load(mmap_mode="r")) of at least PREAD_MIN_BYTES and the platform has pread; else None."""
    if (array is None or not hasattr(os, "preadv") or array.nbytes < PREAD_MIN_BYTES or array.flags.writeable
            or not array.flags.c_contiguous):
        return None
    root = _mapped_root(array)
    if root is None or root.filename is None:
        return None
    return root.filename, root.offset + array.ctypes.data - root.ctypes.data


def collate_windows(data: SequenceData, windows: Windows, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Batch of windows, left-aligned. `inputs[b, t]` is the event at t; `targets[b, t]` is the
    leaf to predict after seeing inputs[b, :t+1] (PAD where not a target). Left alignment keeps
    positions meaningful for the causal encoder."""
    start, length = windows.start[rows], windows.length[rows]
    width = int(length.max()) - 1 if len(rows) else 0
    width = max(width, 1)
    valid = np.arange(width + 1)[None, :] < length[:, None]
    index = np.where(valid, start[:, None] + np.arange(width + 1)[None, :], 0)
    events = np.where(valid, window_values(data.leaves, start, length, index), PAD)
    target_ok = valid & window_values(data.targets(), start, length, index)
    inputs = events[:, :-1]
    targets = np.where(target_ok[:, 1:], events[:, 1:], PAD)
    batch = {"inputs": torch.from_numpy(inputs.copy()), "targets": torch.from_numpy(targets.copy())}
    if data.timestamps is not None:
        times = np.where(valid, window_values(data.timestamps, start, length, index), 0.0)
        batch["input_times"] = torch.from_numpy(times[:, :-1].copy())
        batch["target_times"] = torch.from_numpy(times[:, 1:].copy())
    if data.event_types is not None:
        types = np.where(valid, window_values(data.event_types, start, length, index), PAD)
        batch["input_types"] = torch.from_numpy(types[:, :-1].copy())
    return batch
