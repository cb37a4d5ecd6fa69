"""Tabular feature encoding for ranking models: rows of a table -> tensors.

- categorical columns: a vocabulary from the training rows; index 0 is out-of-vocabulary (unseen
  values, values rarer than `min_count`, missing values);
- numeric columns: standardised with the training mean and standard deviation; a missing value
  becomes the training mean (0 after standardisation) and is counted in the report;
- multi-valued columns (e.g. "Comedy|Drama"): split on a separator, each value indexed like a
  categorical (0 = padding, 1 = out-of-vocabulary), at most `max_values` kept per row; models pool them;
- the scenario column and facet columns (small categorical columns that index tasks, e.g. a user
  group) have closed vocabularies: an unknown value is an error naming the row;
- one label column per task, binary (0/1) or regression; an empty label, or a literal `NaN`
  (what pandas writes for a missing value), masks that task's loss and is counted in the report;
  `inf` or any other text is an error naming the row.

`FeatureEncoder.fit(train_frame)` learns vocabularies and statistics; `transform(frame)` returns
`EncodedRows`; `save`/`load` keep them as JSON beside the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import torch

from hmtrec.config import StrictModel
from hmtrec.errors import DataError
from hmtrec.rundir import get_logger, read_json, write_json

OOV = 0            # categorical: out-of-vocabulary index
MULTI_PAD = 0      # multi-valued: padding index (ignored when pooling)
MULTI_OOV = 1      # multi-valued: out-of-vocabulary index
TASK_FACET = "task"  # the facet of behaviours: one value per task


class MultiValuedFeature(StrictModel):
    column: str
    separator: str = "|"
    max_values: int = 8


class FeatureSchema(StrictModel):
    """Which columns are features, and how. The `features:` section of a ranking config."""

    categorical: list[str] = []
    numeric: list[str] = []
    multi_valued: list[MultiValuedFeature] = []
    scenario: str | None = None            # column naming each row's scenario (surface, tab, region...)
    facets: list[str] = []                 # small categorical columns that index tasks (MFH), e.g. user group
    min_count: int = 1                     # values seen fewer times in training are out-of-vocabulary


class TaskSpec(StrictModel):
    """One prediction head. `label` defaults to the task name."""

    name: str
    label: str | None = None
    type: Literal["binary", "regression"] = "binary"
    weight: float = 1.0

    @property
    def label_column(self) -> str:
        return self.label or self.name


@dataclass
class FeatureLayout:
    """What a model needs to know about the encoded features to build its layers."""

    categorical: list[tuple[str, int]]          # (column, vocabulary size incl. OOV)
    numeric: list[str]
    multi_valued: list[tuple[str, int, int]]    # (column, vocabulary size incl. pad+OOV, max values)
    scenario: str | None
    scenarios: list[str]                        # scenario values in index order
    facets: dict[str, list[str]]                # facet column -> values in index order
    tasks: list[TaskSpec]

    @property
    def n_scenarios(self) -> int:
        return len(self.scenarios)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def facet_values(self, facet: str) -> list[str]:
        """Values of a facet; "task" is the facet of tasks, "scenario" (or the scenario column) the scenarios."""
        if facet == TASK_FACET:
            return self.task_names
        if facet in self.facets:
            return self.facets[facet]
        if self.scenario is not None and facet in ("scenario", self.scenario):
            return self.scenarios
        known = [TASK_FACET] + (["scenario"] if self.scenario else []) + list(self.facets)
        raise KeyError(f"unknown facet {facet!r}; known: {known}")


@dataclass
class EncodedRows:
    """Encoded rows as tensors, ready to be sliced into batches."""

    categorical: torch.Tensor                   # int64 [N, n_categorical]
    numeric: torch.Tensor                       # float32 [N, n_numeric]
    multi_valued: dict[str, torch.Tensor]       # column -> int64 [N, max_values]
    scenario: torch.Tensor | None               # int64 [N]
    facets: torch.Tensor                        # int64 [N, n_facets]
    labels: torch.Tensor                        # float32 [N, n_tasks] (0 where missing)
    label_mask: torch.Tensor                    # bool [N, n_tasks]
    report: dict = field(default_factory=dict)  # counts of what encoding changed (OOV, imputed...)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of `batch_size` rows (in `order` when given), at most `max_batches`."""
        for i, start in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self.batch(order[start:start + batch_size] if order is not None else slice(start, start + batch_size))

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        batch = {"categorical": self.categorical[index], "numeric": self.numeric[index],
                 "facets": self.facets[index], "labels": self.labels[index], "label_mask": self.label_mask[index]}
        for column, values in self.multi_valued.items():
            batch[f"multi:{column}"] = values[index]
        if self.scenario is not None:
            batch["scenario"] = self.scenario[index]
        return batch


def read_rows(path: str | Path) -> pd.DataFrame:
    """Read a CSV/TSV (optionally gzipped) or Parquet file with every column as text, so the encoder
    decides what is numeric and can name the row of a bad value."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path))
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
            return frame.astype({c: "string" for c in frame.columns if frame[c].dtype == object})
        separator = "\t" if name.endswith(".tsv") else ","
        return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"cannot read the table: {error}", file=str(path)) from None


def _first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0]) + 1


def _as_text(series: pd.Series) -> pd.Series:
    """Text form of a column for vocabulary lookup; missing stays missing."""
    if pd.api.types.is_float_dtype(series):
        # 3.0 and "3" must be the same value: integral floats print without ".0"
        values = series.to_numpy()
        integral = np.isfinite(values) & (values == np.round(values))
        text = series.astype(str)
        text[integral] = pd.Series(values[integral].astype(np.int64), index=series.index[integral]).astype(str)
        return text.where(series.notna())
    return series.astype("string").astype(object).where(series.notna())


class FeatureEncoder:
    def __init__(self, schema: FeatureSchema, tasks: list[TaskSpec]):
        names = [t.name for t in tasks]
        if not tasks:
            raise DataError("at least one task is needed")
        if len(set(names)) != len(names):
            raise DataError(f"task names must be unique, got {names}")
        self.schema = schema
        self.tasks = list(tasks)
        self.vocabularies: dict[str, list[str]] = {}     # categorical and multi-valued columns
        self.closed_vocabularies: dict[str, list[str]] = {}  # scenario and facet columns
        self.numeric_stats: dict[str, tuple[float, float]] = {}
        self.fitted = False

    # ---- fitting -------------------------------------------------------------------------------
    def _check_columns(self, frame: pd.DataFrame, file: str | None, need_labels: bool) -> None:
        wanted = (self.schema.categorical + self.schema.numeric + [m.column for m in self.schema.multi_valued]
                  + ([self.schema.scenario] if self.schema.scenario else []) + self.schema.facets)
        if need_labels:
            wanted += [t.label_column for t in self.tasks]
        missing = list(dict.fromkeys(c for c in wanted if c not in frame.columns))
        if missing:
            raise DataError(f"{len(missing)} missing column{'s' if len(missing) > 1 else ''} {missing}; "
                            f"the table has {list(frame.columns)[:20]}", file=file)

    def fit(self, frame: pd.DataFrame, file: str | None = None) -> "FeatureEncoder":
        self._check_columns(frame, file, need_labels=True)
        schema = self.schema
        for column in schema.categorical:
            counts = _as_text(frame[column]).value_counts()
            self.vocabularies[column] = sorted(counts.index[counts >= schema.min_count].tolist())
        for spec in schema.multi_valued:
            values = _as_text(frame[spec.column]).dropna().str.split(spec.separator, regex=False).explode()
            counts = values[values != ""].value_counts()
            self.vocabularies[spec.column] = sorted(counts.index[counts >= schema.min_count].tolist())
        for column in schema.numeric:
            values = self._numeric(frame, column, file)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
            std = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
            self.numeric_stats[column] = (mean, std if std > 0 else 1.0)
        for column in ([schema.scenario] if schema.scenario else []) + schema.facets:
            text = _as_text(frame[column])
            if text.isna().any():
                raise DataError("missing value in a scenario/facet column", file=file,
                                row=_first_bad_row(text.isna().to_numpy()), column=column)
            self.closed_vocabularies[column] = sorted(text.unique().tolist())
        self.fitted = True
        return self

    # ---- encoding ------------------------------------------------------------------------------
    @staticmethod
    def _numeric(frame: pd.DataFrame, column: str, file: str | None, first_row: int = 1,
                 nan_is_missing: bool = False) -> np.ndarray:
        """Finite numbers, NaN where empty (and, with `nan_is_missing`, where the text is "NaN")."""
        raw = frame[column]
        present = raw.notna().to_numpy()
        if not pd.api.types.is_numeric_dtype(raw):
            text = raw.astype("string").str.strip()
            blank = text == ""
            if nan_is_missing:
                blank = blank | (text.str.lower() == "nan")
            present = present & (~blank).fillna(False).to_numpy(dtype=bool)
        values = pd.to_numeric(raw.where(present), errors="coerce").to_numpy(dtype=np.float64)
        bad = (np.isnan(values) & present) | np.isinf(values)
        if bad.any():
            row = _first_bad_row(bad)
            raise DataError(f"not a finite number: {raw.iloc[row - 1]!r}", file=file, row=row + first_row - 1,
                            column=column)
        return values

    def _codes(self, text: pd.Series, vocabulary: list[str], offset: int) -> np.ndarray:
        codes = pd.Index(vocabulary, dtype=object).get_indexer(text.astype(object)).astype(np.int64)
        return codes + offset   # unknown and missing -> offset - 1

    def transform(self, frame: pd.DataFrame, file: str | None = None, require_labels: bool = True,
                  first_row: int = 1) -> EncodedRows:
        """Encode rows. With `require_labels=False` (prediction) absent label columns mean "no label".
        `first_row` is the file row of the frame's first row (for frames cut from a larger file)."""
        if not self.fitted:
            raise RuntimeError("FeatureEncoder.transform before fit/load")
        self._check_columns(frame, file, need_labels=require_labels)
        schema, n = self.schema, len(frame)
        report: dict = {"rows": n}

        categorical = np.zeros((n, len(schema.categorical)), dtype=np.int64)
        for j, column in enumerate(schema.categorical):
            categorical[:, j] = self._codes(_as_text(frame[column]), self.vocabularies[column], offset=1)
            report[f"oov:{column}"] = int((categorical[:, j] == OOV).sum())

        numeric = np.zeros((n, len(schema.numeric)), dtype=np.float32)
        for j, column in enumerate(schema.numeric):
            values = self._numeric(frame, column, file, first_row)
            mean, std = self.numeric_stats[column]
            missing = np.isnan(values)
            numeric[:, j] = np.where(missing, 0.0, (values - mean) / std)
            report[f"imputed:{column}"] = int(missing.sum())

        multi = {}
        for spec in schema.multi_valued:
            multi[spec.column] = self._encode_multi(frame[spec.column], spec)
            report[f"oov:{spec.column}"] = int((multi[spec.column] == MULTI_OOV).sum())

        scenario = None
        if schema.scenario:
            scenario = self._closed_codes(frame, schema.scenario, file, first_row)
        facets = np.zeros((n, len(schema.facets)), dtype=np.int64)
        for j, column in enumerate(schema.facets):
            facets[:, j] = self._closed_codes(frame, column, file, first_row)

        labels = np.zeros((n, len(self.tasks)), dtype=np.float32)
        mask = np.zeros((n, len(self.tasks)), dtype=bool)
        for j, task in enumerate(self.tasks):
            if task.label_column not in frame.columns:
                continue
            values = self._numeric(frame, task.label_column, file, first_row, nan_is_missing=True)
            present = ~np.isnan(values)
            if task.type == "binary":
                bad = present & (values != 0) & (values != 1)
                if bad.any():
                    row = _first_bad_row(bad)
                    raise DataError(f"a binary label must be 0 or 1, got {frame[task.label_column].iloc[row - 1]!r}",
                                    file=file, row=row + first_row - 1, column=task.label_column)
            labels[:, j] = np.where(present, values, 0.0)
            mask[:, j] = present
            report[f"missing_label:{task.name}"] = int((~present).sum())
        return EncodedRows(torch.from_numpy(categorical), torch.from_numpy(numeric),
                           {k: torch.from_numpy(v) for k, v in multi.items()},
                           None if scenario is None else torch.from_numpy(scenario),
                           torch.from_numpy(facets), torch.from_numpy(labels), torch.from_numpy(mask), report)

    def _closed_codes(self, frame: pd.DataFrame, column: str, file: str | None, first_row: int = 1) -> np.ndarray:
        vocabulary = self.closed_vocabularies[column]
        codes = self._codes(_as_text(frame[column]), vocabulary, offset=0)
        bad = codes < 0
        if bad.any():
            row = _first_bad_row(bad)
            raise DataError(f"unknown value {frame[column].iloc[row - 1]!r}; the model knows {vocabulary}",
                            file=file, row=row + first_row - 1, column=column)
        return codes

    def _encode_multi(self, series: pd.Series, spec: MultiValuedFeature) -> np.ndarray:
        n = len(series)
        out = np.full((n, spec.max_values), MULTI_PAD, dtype=np.int64)
        values = _as_text(series).reset_index(drop=True).dropna().str.split(spec.separator, regex=False).explode()
        values = values[values != ""]
        if len(values) == 0:
            return out
        rows = values.index.to_numpy()
        position = values.groupby(level=0).cumcount().to_numpy()
        keep = position < spec.max_values
        codes = self._codes(values, self.vocabularies[spec.column], offset=2)   # unknown -> 1 (OOV)
        out[rows[keep], position[keep]] = codes[keep]
        return out

    # ---- layout and persistence ----------------------------------------------------------------
    def layout(self) -> FeatureLayout:
        schema = self.schema
        return FeatureLayout(
            categorical=[(c, len(self.vocabularies[c]) + 1) for c in schema.categorical],
            numeric=list(schema.numeric),
            multi_valued=[(m.column, len(self.vocabularies[m.column]) + 2, m.max_values) for m in schema.multi_valued],
            scenario=schema.scenario,
            scenarios=list(self.closed_vocabularies.get(schema.scenario, [])) if schema.scenario else [],
            facets={c: list(self.closed_vocabularies[c]) for c in schema.facets},
            tasks=list(self.tasks))

    def save(self, path: str | Path) -> None:
        write_json(path, {"schema": self.schema.model_dump(mode="json"),
                          "tasks": [t.model_dump(mode="json") for t in self.tasks],
                          "vocabularies": self.vocabularies, "closed_vocabularies": self.closed_vocabularies,
                          "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()}})

    @classmethod
    def load(cls, path: str | Path) -> "FeatureEncoder":
        saved = read_json(path)
        encoder = cls(FeatureSchema.model_validate(saved["schema"]),
                      [TaskSpec.model_validate(t) for t in saved["tasks"]])
        encoder.vocabularies = saved["vocabularies"]
        encoder.closed_vocabularies = saved["closed_vocabularies"]
        encoder.numeric_stats = {k: (float(v[0]), float(v[1])) for k, v in saved["numeric_stats"].items()}
        encoder.fitted = True
        return encoder


def log_report(report: dict, name: str) -> None:
    """Log what encoding changed (out-of-vocabulary values, imputed numbers, missing labels)."""
    changed = {k: v for k, v in report.items() if k != "rows" and v}
    get_logger().info("%s: %d rows encoded; %s", name, report.get("rows", 0), changed or "nothing changed")
