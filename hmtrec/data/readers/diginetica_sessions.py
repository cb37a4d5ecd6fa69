"""Diginetica in the standard session-based benchmark protocol (SR-GNN preprocessing).

Files: `train_sessions.txt(.gz)` (one session per line, item ids space-separated in time order),
`test_prefixes.tsv(.gz)` (`prefix<TAB>target`, every prefix of every test session, as released)
and `item_category.csv(.gz)` (`item_id,category_id`).

Test sessions are rebuilt from the prefixes: consecutive lines belong to one session when the
line's prefix plus its target equals the previous line's prefix (SR-GNN writes each session's
prefixes longest first). Every line becomes exactly one target position of one rebuilt session,
so evaluating all targets of the test split reproduces the released test cases one to one.
There is no time column: events are in order and `timestamps` is None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hmtrec.data.readers import SourceData, find_file, source_folder
from hmtrec.data.schema import ItemColumns, build_catalogue, map_items, read_table
from hmtrec.data.validation import MAX_LISTED, decode, read_bytes
from hmtrec.errors import DataError


def _lines(path: Path) -> list[str]:
    """The file's lines; compression and encoding faults are named (hmtrec.data.validation)."""
    lines = decode(read_bytes(path), "utf8", file=str(path), delimiter=None).splitlines()
    if not any(line.strip() for line in lines):
        raise DataError("the file has no data rows", file=str(path))
    return lines


def _check_ids(text: str, file: str, line: int, column: str) -> None:
    tokens = text.split()
    if not tokens:
        raise DataError("empty item list", file=file, row=line, column=column)
    for token in tokens:
        if not token.isdigit() or int(token) == 0:
            raise DataError(f"item id {token!r} is not a positive integer", file=file, row=line, column=column)


def parse_id_lists(texts: list[str], file: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Space-separated positive integer ids per line -> (ids int64 [n], lengths [n_lines]).
    Bulk conversion; the line-by-line check runs only to name the first bad line."""
    lengths = np.fromiter((text.count(" ") + 1 for text in texts), dtype=np.int64, count=len(texts))
    tokens = " ".join(texts).split()
    try:
        ids = np.array(tokens, dtype=np.int64)
        clean = int(lengths.sum()) == len(ids) and bool((ids > 0).all())
    except ValueError:
        clean = False
    if not clean:
        bad = []
        for number, text in enumerate(texts, start=1):
            try:
                _check_ids(text, file, number, column)
            except DataError as error:
                bad.append(error)
        if bad:
            more = "" if len(bad) == 1 else (
                f"; {len(bad):,} lines in all: " + ", ".join(str(error.row) for error in bad[:MAX_LISTED])
                + (f", and {len(bad) - MAX_LISTED:,} more" if len(bad) > MAX_LISTED else ""))
            first = bad[0]
            raise DataError(str(first).split(": ", 1)[-1] + more, file=file, row=first.row, column=column)
        lengths = np.array([len(text.split()) for text in texts], dtype=np.int64)
        ids = np.array(tokens, dtype=np.int64)
    return ids, lengths


def read_train(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(item ids [n_events], session lengths [n_sessions]) from one session per line."""
    return parse_id_lists(_lines(path), str(path), "items")


def read_test_cases(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix ids, prefix lengths, targets) of every `prefix<TAB>target` line."""
    file = str(path)
    lines = _lines(path)
    fields = [line.split("\t") for line in lines]
    malformed = [number for number, parts in enumerate(fields, start=1) if len(parts) != 2]
    if malformed:
        number = malformed[0]
        more = "" if len(malformed) == 1 else (f"; {len(malformed):,} lines in all: "
                                               + ", ".join(map(str, malformed[:MAX_LISTED]))
                                               + (f", and {len(malformed) - MAX_LISTED:,} more"
                                                  if len(malformed) > MAX_LISTED else ""))
        raise DataError(f"malformed row: {len(fields[number - 1])} tab-separated fields, expected 2 "
                        f"(prefix, target){more}", file=file, row=number)
    prefixes, prefix_lengths = parse_id_lists([parts[0] for parts in fields], file, "prefix")
    targets, target_lengths = parse_id_lists([parts[1] for parts in fields], file, "target")
    if (target_lengths != 1).any():
        row = int(np.flatnonzero(target_lengths != 1)[0]) + 1
        raise DataError("the target must be one item id", file=file, row=row, column="target")
    return prefixes, prefix_lengths, targets


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [start, start + length) (vectorised)."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    return np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(total)


def rebuild_test_sessions(prefixes: np.ndarray, prefix_lengths: np.ndarray, targets: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Test cases -> (session ids [n], session lengths, session of each case, position of each case).

    Case k continues the session of case k-1 when prefix_k + [target_k] == prefix_{k-1}; a
    session is the first case's prefix plus its target, and case k is position len(prefix_k)."""
    n = len(prefix_lengths)
    starts = np.r_[0, np.cumsum(prefix_lengths)[:-1]]
    continues = np.zeros(n, dtype=bool)
    if n > 1:
        k = np.arange(1, n)
        candidate = (prefix_lengths[k] + 1 == prefix_lengths[k - 1])
        candidate &= prefixes[starts[k - 1] + prefix_lengths[k - 1] - 1] == targets[k]
        k = k[candidate]
        # compare prefix_k with the first len(prefix_k) ids of prefix_{k-1}
        here = _ranges(starts[k], prefix_lengths[k])
        there = _ranges(starts[k - 1], prefix_lengths[k])
        mismatches = np.bincount(np.repeat(np.arange(len(k)), prefix_lengths[k]),
                                 weights=(prefixes[here] != prefixes[there]), minlength=len(k))
        continues[k[mismatches == 0]] = True
    first = np.flatnonzero(~continues)
    case_session = np.cumsum(~continues) - 1
    session_lengths = prefix_lengths[first] + 1
    session_starts = np.r_[0, np.cumsum(session_lengths)[:-1]]
    sessions = np.empty(int(session_lengths.sum()), dtype=np.int64)
    sessions[_ranges(session_starts, prefix_lengths[first])] = prefixes[_ranges(starts[first], prefix_lengths[first])]
    sessions[session_starts + prefix_lengths[first]] = targets[first]
    return sessions, session_lengths, case_session, prefix_lengths.copy()


def reproduces_cases(sessions, session_lengths, case_session, case_position,
                     prefixes, prefix_lengths, targets) -> bool:
    """Does expanding every (session, position) give back exactly each case's prefix and target?"""
    session_starts = np.r_[0, np.cumsum(session_lengths)[:-1]]
    if (case_position >= session_lengths[case_session]).any() or (case_position != prefix_lengths).any():
        return False
    expanded = sessions[_ranges(session_starts[case_session], case_position)]
    return bool(np.array_equal(expanded, prefixes) and
                np.array_equal(sessions[session_starts[case_session] + case_position], targets))


def _frame(items: np.ndarray, lengths: np.ndarray, first_id: int, taxonomy, file: str, column: str,
           target_events: np.ndarray | None = None) -> pd.DataFrame:
    """Canonical frame; sessions are numbered first_id, first_id + 1, ... in file order."""
    # name the line of each event (map_items would count events)
    lines = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    leaves = map_items(items, taxonomy, file=file, column=column, rows=lines, first_line=None)
    frame = pd.DataFrame({
        "sequence": np.repeat(np.arange(first_id, first_id + len(lengths), dtype=np.int64), lengths),
        "leaf": leaves,
        "time": np.arange(len(items), dtype=np.float64),
    })
    if target_events is not None:
        mask = np.zeros(len(items), dtype=bool)
        mask[target_events] = True
        frame["target"] = mask
    return frame


def read(cfg) -> SourceData:
    folder = source_folder(cfg, "diginetica-sessions")
    category_path = find_file(folder, "item_category.csv.gz", "item_category.csv")
    items = read_table(category_path, string_columns=["item_id", "category_id"], settings=cfg.validation)
    catalogue = build_catalogue(items, ItemColumns(item="item_id", levels=["category_id"],
                                                   level_names=["category", "item"]), file=str(category_path),
                                settings=cfg.validation)
    train_path = find_file(folder, "train_sessions.txt.gz", "train_sessions.txt")
    test_path = find_file(folder, "test_prefixes.tsv.gz", "test_prefixes.tsv")
    train_items, train_lengths = read_train(train_path)
    prefixes, prefix_lengths, targets = read_test_cases(test_path)
    sessions, session_lengths, case_session, case_position = rebuild_test_sessions(prefixes, prefix_lengths, targets)
    if not reproduces_cases(sessions, session_lengths, case_session, case_position, prefixes, prefix_lengths, targets):
        raise DataError("rebuilt test sessions do not reproduce the test cases", file=str(test_path))
    complete = int((np.bincount(case_session, minlength=len(session_lengths)) == session_lengths - 1).sum())
    session_starts = np.r_[0, np.cumsum(session_lengths)[:-1]]
    train = _frame(train_items, train_lengths, 1, catalogue.taxonomy, str(train_path), "items")
    test = _frame(sessions, session_lengths, len(train_lengths) + 1, catalogue.taxonomy, str(test_path),
                  "prefix", target_events=session_starts[case_session] + case_position)
    notes = [f"diginetica-sessions: {len(train_lengths):,} training sessions (ids 1..{len(train_lengths)}), "
             f"{len(targets):,} test cases rebuilt into {len(session_lengths):,} test sessions "
             f"(ids from {len(train_lengths) + 1}; {complete:,} with every prefix present)"]
    return SourceData(name="diginetica-sessions", events=None, taxonomy=catalogue.taxonomy, has_time=False,
                      given={"train": train, "test": test}, notes=notes)
