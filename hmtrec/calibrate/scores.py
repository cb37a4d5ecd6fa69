"""Score tables: one row per impression, one probability column per head, its 0/1 label column,
and optionally a scenario column and a request (group) column.

Calibration and utility tuning read nothing else, so they work on the ranking pipeline's
`predictions_*.csv` and on any table produced by a model trained elsewhere. Every problem is a
`DataError` naming the file, the 1-based data row and the column.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hmtrec.config import StrictModel
from hmtrec.errors import DataError

# Label columns are found by these spellings when a head's label column is not given.
LABEL_PATTERNS = ("{head}_label", "label_{head}", "{head}_true", "y_{head}", "{head}_y")
DEFAULT_SCENARIO_COLUMN = "scenario"


class ScoreColumns(StrictModel):
    """Which columns of a score table hold what. Everything left empty is detected."""

    heads: list[str] | None = None
    """Head names. Default: every numeric column that has a label column by one of the spellings
    `<head>_label`, `label_<head>`, `<head>_true`, `y_<head>`, `<head>_y`."""
    scores: dict[str, str] = {}
    """head -> score column (default: the head's own name)."""
    labels: dict[str, str] = {}
    """head -> 0/1 label column (default: detected by the spellings above)."""
    scenario: str | None = DEFAULT_SCENARIO_COLUMN
    """Scenario column; used when present. Naming one that is absent is an error, except the default."""
    group: str | None = None
    """Request column: the impressions one ranking orders together (needed by utility tuning)."""
    truth: dict[str, str] = {}
    """head -> column of known true probabilities (synthetic data); default `p_true_<head>` if present."""


@dataclass
class ScoreTable:
    """A validated score table. `frame` keeps every original column (in the original row order)."""

    frame: pd.DataFrame
    heads: list[str]
    score_columns: dict[str, str]
    label_columns: dict[str, str] = field(default_factory=dict)
    scenario_column: str | None = None
    group_column: str | None = None
    source: str = "table"
    truth_columns: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    def scores(self, head: str) -> np.ndarray:
        return self.frame[self.score_columns[head]].to_numpy(dtype=np.float64)

    def labels(self, head: str) -> np.ndarray:
        """0/1 labels, NaN where the row has no label for this head."""
        if head not in self.label_columns:
            raise DataError(f"head {head!r} has no label column", file=self.source)
        return self.frame[self.label_columns[head]].to_numpy(dtype=np.float64)

    def labelled(self, head: str) -> np.ndarray:
        """Rows that carry a label for this head."""
        return ~np.isnan(self.labels(head))

    def truth(self, head: str) -> np.ndarray | None:
        """Known true probabilities of a head, or None."""
        column = self.truth_columns.get(head)
        return None if column is None else self.frame[column].to_numpy(dtype=np.float64)

    def scenarios(self) -> np.ndarray | None:
        if self.scenario_column is None:
            return None
        return self.frame[self.scenario_column].astype(str).to_numpy()

    def with_scores(self, scores: dict[str, np.ndarray]) -> "ScoreTable":
        """A copy whose score columns are replaced (e.g. by calibrated probabilities)."""
        frame = self.frame.copy()
        for head, values in scores.items():
            frame[self.score_columns[head]] = values
        return ScoreTable(frame, list(self.heads), dict(self.score_columns), dict(self.label_columns),
                          self.scenario_column, self.group_column, self.source, dict(self.truth_columns),
                          list(self.notes))

    def subset(self, rows: np.ndarray) -> "ScoreTable":
        """The rows selected by a boolean mask or index array (same columns)."""
        frame = self.frame.iloc[rows] if np.asarray(rows).dtype != bool else self.frame[np.asarray(rows)]
        return ScoreTable(frame.reset_index(drop=True), list(self.heads), dict(self.score_columns),
                          dict(self.label_columns), self.scenario_column, self.group_column, self.source,
                          dict(self.truth_columns), list(self.notes))


def read_table(path: str | Path) -> pd.DataFrame:
    """CSV (delimiter , ; tab or |, read from the header; gzip allowed) or Parquet."""
    path = Path(path)
    if not path.exists():
        raise DataError("score table does not exist", file=str(path))
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=_delimiter(path))
    except (ValueError, pd.errors.ParserError, OSError) as error:
        raise DataError(f"cannot read the score table: {error}", file=str(path)) from None


def _delimiter(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        header = f.readline()
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def detect_label_column(columns, head: str) -> str | None:
    for pattern in LABEL_PATTERNS:
        name = pattern.format(head=head)
        if name in columns:
            return name
    return None


def _detect_heads(frame: pd.DataFrame, source: str) -> list[str]:
    heads = [c for c in frame.columns
             if pd.api.types.is_numeric_dtype(frame[c]) and detect_label_column(frame.columns, c) is not None
             and c not in _all_label_columns(frame.columns)]
    if not heads:
        raise DataError("no heads found: name them (columns.heads / --heads), or give each score column "
                        f"a label column spelled {', '.join(p.format(head='<head>') for p in LABEL_PATTERNS)}; "
                        f"columns are {list(frame.columns)}", file=source)
    return heads


def _all_label_columns(columns) -> set[str]:
    found = set()
    for column in columns:
        label = detect_label_column(columns, column)
        if label is not None:
            found.add(label)
    return found


def _first_bad_row(mask: np.ndarray) -> int:
    """1-based data row (header excluded) of the first True."""
    return int(np.flatnonzero(mask)[0]) + 1


def _numeric_column(frame: pd.DataFrame, column: str, source: str, what: str,
                    allow_missing: bool = False) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    not_numeric = values.isna().to_numpy() & frame[column].notna().to_numpy()
    if not_numeric.any():
        row = _first_bad_row(not_numeric)
        raise DataError(f"{what} is not a number: {frame[column].iloc[row - 1]!r}", file=source, row=row,
                        column=column)
    values = values.to_numpy(dtype=np.float64)
    missing = np.isinf(values) if allow_missing else ~np.isfinite(values)
    if missing.any():
        row = _first_bad_row(missing)
        raise DataError(f"{what} is missing or not finite ({frame[column].iloc[row - 1]!r}); "
                        f"{int(missing.sum())} such row(s)", file=source, row=row, column=column)
    return values


def validate_scores(frame: pd.DataFrame, columns: ScoreColumns, *, source: str = "table",
                    require_labels: bool = True, require_group: bool = False) -> ScoreTable:
    """Check a frame against `columns` and return a ScoreTable. Scores must be probabilities in
    [0, 1] and never missing; labels are 0/1, or empty (NaN) where the row has no label for that
    head (e.g. a task outside its facet): such rows are left out of that head's fits and metrics.
    Detected heads (none named) whose labels are not 0/1 (regression tasks) are skipped with a note."""
    notes: list[str] = []
    detected = not columns.heads
    heads = list(columns.heads) if columns.heads else _detect_heads(frame, source)
    if detected:
        for head in list(heads):
            labels = pd.to_numeric(frame[detect_label_column(frame.columns, head)], errors="coerce")
            if not labels.dropna().isin([0, 1]).all():
                heads.remove(head)
                notes.append(f"column {head!r} skipped: its labels are not 0/1 (not a probability head)")
        if not heads:
            raise DataError(f"no head with 0/1 labels found ({'; '.join(notes)})", file=source)
    if len(set(heads)) != len(heads):
        raise DataError(f"heads listed twice: {heads}", file=source)
    present = set(frame.columns)
    score_columns, label_columns = {}, {}
    for head in heads:
        score_column = columns.scores.get(head, head)
        if score_column not in present:
            raise DataError(f"score column of head {head!r} is missing; columns are {list(frame.columns)}",
                            file=source, column=score_column)
        score_columns[head] = score_column
        label_column = columns.labels.get(head) or detect_label_column(frame.columns, head)
        if label_column is None or label_column not in present:
            if require_labels:
                expected = label_column or " or ".join(p.format(head=head) for p in LABEL_PATTERNS)
                raise DataError(f"label column of head {head!r} is missing (expected {expected})",
                                file=source, column=label_column or LABEL_PATTERNS[0].format(head=head))
            continue
        label_columns[head] = label_column
    truth_columns = {}
    for head in heads:
        column = columns.truth.get(head, f"p_true_{head}")
        if column in present:
            truth_columns[head] = column
        elif head in columns.truth:
            raise DataError(f"true-probability column of head {head!r} is missing", file=source, column=column)
    unknown = (set(columns.scores) | set(columns.labels) | set(columns.truth)) - set(heads)
    if unknown:
        raise DataError(f"columns given for unknown heads {sorted(unknown)}; heads are {heads}", file=source)

    clean = frame.copy()
    for head in heads:
        column = score_columns[head]
        scores = _numeric_column(frame, column, source, f"score of head {head!r}")
        outside = (scores < 0.0) | (scores > 1.0)
        if outside.any():
            row = _first_bad_row(outside)
            raise DataError(f"score of head {head!r} is {scores[row - 1]!r}, not a probability in [0, 1] "
                            "(convert logits with a sigmoid first)", file=source, row=row, column=column)
        clean[column] = scores
        if head in label_columns:
            column = label_columns[head]
            labels = _numeric_column(frame, column, source, f"label of head {head!r}", allow_missing=True)
            if np.isnan(labels).all():
                raise DataError(f"head {head!r} has no labelled row", file=source, column=column)
            not_binary = (labels != 0.0) & (labels != 1.0) & ~np.isnan(labels)
            if not_binary.any():
                row = _first_bad_row(not_binary)
                raise DataError(f"label of head {head!r} is {labels[row - 1]!r}, expected 0 or 1",
                                file=source, row=row, column=column)
            clean[column] = labels
        if head in truth_columns:
            clean[truth_columns[head]] = _numeric_column(frame, truth_columns[head], source,
                                                         f"true probability of head {head!r}")

    scenario = columns.scenario
    if scenario is not None and scenario not in present:
        if "scenario" in columns.model_fields_set:
            raise DataError("scenario column is missing", file=source, column=scenario)
        scenario = None
    if scenario is not None and frame[scenario].isna().any():
        row = _first_bad_row(frame[scenario].isna().to_numpy())
        raise DataError("scenario is missing", file=source, row=row, column=scenario)

    group = columns.group
    if require_group and group is None:
        raise DataError("a request (group) column is needed: set columns.group / --group", file=source)
    if group is not None:
        if group not in present:
            raise DataError("request (group) column is missing", file=source, column=group)
        if frame[group].isna().any():
            row = _first_bad_row(frame[group].isna().to_numpy())
            raise DataError("request id is missing", file=source, row=row, column=group)
    if len(frame) == 0:
        raise DataError("score table has no rows", file=source)
    return ScoreTable(clean, heads, score_columns, label_columns, scenario, group, source, truth_columns, notes)


def read_scores(path: str | Path, columns: ScoreColumns | None = None, *, require_labels: bool = True,
                require_group: bool = False) -> ScoreTable:
    """Read and validate a score table file (CSV or Parquet)."""
    frame = read_table(path)
    return validate_scores(frame, columns or ScoreColumns(), source=str(path), require_labels=require_labels,
                           require_group=require_group)


def from_arrays(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None = None,
                scenario: np.ndarray | None = None, group: np.ndarray | None = None,
                source: str = "arrays") -> ScoreTable:
    """A ScoreTable from in-memory arrays (label column `<head>_label`), validated like a file."""
    data: dict[str, np.ndarray] = {}
    for head, values in scores.items():
        data[head] = np.asarray(values)
    for head, values in (labels or {}).items():
        data[f"{head}_label"] = np.asarray(values)
    if scenario is not None:
        data[DEFAULT_SCENARIO_COLUMN] = np.asarray(scenario)
    if group is not None:
        data["request_id"] = np.asarray(group)
    columns = ScoreColumns(heads=list(scores), group="request_id" if group is not None else None)
    return validate_scores(pd.DataFrame(data), columns, source=source, require_labels=labels is not None)
