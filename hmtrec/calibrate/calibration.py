"""A fitted calibration for every head of a ranker (optionally one per scenario), saved as
`calibration.json` beside the model and applied to score frames at prediction time.

    calibration = fit_calibration(valid_table, CalibrationSettings(method="isotonic"))
    save_calibration(calibration, run_dir)               # run_dir / calibration.json
    frame = apply_calibration(frame, load_calibration(run_dir))
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hmtrec.calibrate.calibrators import CalibrationChain, build_chain
from hmtrec.calibrate.scores import ScoreTable
from hmtrec.config import StrictModel
from hmtrec.errors import ConfigError, DataError
from hmtrec.rundir import get_logger, read_json, write_json

CALIBRATION_FILE = "calibration.json"
FORMAT = "hmtrec.calibration"
VERSION = 1
RAW_SUFFIX = "_raw"

Method = Literal["platt", "isotonic", "temperature", "downsampling", "none"]


class CalibrationSettings(StrictModel):
    method: Method = "isotonic"
    """Calibrator fitted for every head (after the down-sampling correction, when one is given)."""
    methods: dict[str, Method] = {}
    """Per-head override of `method`."""
    downsampling: dict[str, float] = {}
    """head -> w, the fraction of that head's negatives kept in the training data (0 < w <= 1)."""
    per_scenario: bool = False
    """Fit one calibrator per scenario (the table's scenario column); small scenarios use the global one."""
    min_scenario_rows: int = 500
    min_scenario_positives: int = 20

    def method_for(self, head: str) -> str:
        return self.methods.get(head, self.method)


@dataclass
class HeadCalibration:
    score_column: str
    chain: CalibrationChain
    by_scenario: dict[str, CalibrationChain] = field(default_factory=dict)

    def transform(self, scores: np.ndarray, scenarios: np.ndarray | None) -> np.ndarray:
        out = self.chain.transform(scores)
        if scenarios is not None and self.by_scenario:
            for scenario, chain in self.by_scenario.items():
                rows = scenarios == scenario
                if rows.any():
                    out[rows] = chain.transform(scores[rows])
        return out

    def fallback_rows(self, scenarios: np.ndarray | None) -> dict[str, int]:
        """Scenario -> number of rows that get the global calibrator because the scenario has no
        calibrator of its own (no or too little calibration data for it)."""
        if scenarios is None:
            return {}
        values, counts = np.unique(scenarios, return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts) if str(v) not in self.by_scenario}

    @property
    def monotone(self) -> bool:
        return self.chain.monotone and all(c.monotone for c in self.by_scenario.values())


@dataclass
class Calibration:
    heads: dict[str, HeadCalibration]
    scenario_column: str | None = None
    fitted_on: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def transform(self, table: ScoreTable) -> ScoreTable:
        """The table with every calibrated head's scores replaced by calibrated probabilities."""
        scenarios = table.scenarios() if self.scenario_column else None
        return table.with_scores({head: self.heads[head].transform(table.scores(head), scenarios)
                                  for head in table.heads if head in self.heads})

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "scenario_column": self.scenario_column,
            "heads": {head: {"score_column": hc.score_column, "method": hc.chain.method,
                             "steps": hc.chain.to_list(),
                             "scenarios": {s: c.to_list() for s, c in hc.by_scenario.items()}}
                      for head, hc in self.heads.items()},
            "fitted_on": self.fitted_on, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = CALIBRATION_FILE) -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source}: not an hmtrec calibration file (key 'format' is not {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(f"{source}: key 'version': unsupported version {data.get('version')!r}")
        heads = {}
        for head, item in data.get("heads", {}).items():
            try:
                heads[head] = HeadCalibration(
                    score_column=item["score_column"], chain=CalibrationChain.from_list(item["steps"]),
                    by_scenario={str(s): CalibrationChain.from_list(steps)
                                 for s, steps in item.get("scenarios", {}).items()})
            except KeyError as error:
                raise ConfigError(f"{source}: key 'heads.{head}.{error.args[0]}' is missing") from None
            except ConfigError as error:
                raise ConfigError(f"{source}: key 'heads.{head}': {error}") from None
        return cls(heads, data.get("scenario_column"), data.get("fitted_on", {}), data.get("notes", []))


def _enough(y: np.ndarray, settings: CalibrationSettings) -> str | None:
    """Why a scenario is too small for its own calibrator, or None."""
    positives = int(y.sum())
    if len(y) < settings.min_scenario_rows:
        return f"{len(y)} rows < min_scenario_rows={settings.min_scenario_rows}"
    if positives < settings.min_scenario_positives:
        return f"{positives} positives < min_scenario_positives={settings.min_scenario_positives}"
    if positives == len(y):
        return "no negatives"
    return None


def fit_calibration(table: ScoreTable, settings: CalibrationSettings | None = None) -> Calibration:
    """Fit one chain per head (and per scenario when asked) on a table with labels."""
    settings = settings or CalibrationSettings()
    unknown = (set(settings.methods) | set(settings.downsampling)) - set(table.heads)
    if unknown:
        raise ConfigError(f"calibration settings name unknown heads {sorted(unknown)}; heads are {table.heads}")
    if settings.per_scenario and table.scenario_column is None:
        raise ConfigError("per_scenario: true needs a scenario column in the score table "
                          f"({table.source} has none)")
    scenarios = table.scenarios() if settings.per_scenario else None
    notes: list[str] = []
    heads = {}
    for head in table.heads:
        method = settings.method_for(head)
        keep_rate = settings.downsampling.get(head)
        if method == "downsampling" and keep_rate is None:
            raise ConfigError(f"head {head!r}: method 'downsampling' needs the kept fraction of its negatives: "
                              f"set calibration.downsampling.{head} (or --downsampling {head}=w)")
        labelled = table.labelled(head)
        p, y = table.scores(head)[labelled], table.labels(head)[labelled]
        if method not in ("none", "downsampling") and (y.min() == y.max()):
            raise DataError(f"head {head!r}: labels are all {int(y[0])}; a calibrator needs both classes",
                            file=table.source, column=table.label_columns[head])
        chain = build_chain(method, keep_rate).fit(p, y)
        by_scenario = {}
        if scenarios is not None:
            head_scenarios = scenarios[labelled]
            for scenario in np.unique(head_scenarios):
                rows = head_scenarios == scenario
                reason = _enough(y[rows], settings)
                if reason is not None:
                    notes.append(f"head {head!r}, scenario {scenario!r}: global calibrator used ({reason})")
                    continue
                by_scenario[str(scenario)] = build_chain(method, keep_rate).fit(p[rows], y[rows])
        calibration = HeadCalibration(table.score_columns[head], chain, by_scenario)
        if not calibration.monotone:
            notes.append(f"head {head!r}: the fitted map is decreasing (Platt a <= 0): its scores rank "
                         "negatives above positives on the validation data")
        heads[head] = calibration
    for note in notes:
        get_logger().info("calibration: %s", note)
    fitted_on = {"source": table.source, "rows": len(table),
                 "date": _dt.datetime.now().isoformat(timespec="seconds"),
                 "settings": settings.model_dump(mode="json")}
    return Calibration(heads, table.scenario_column if settings.per_scenario else None, fitted_on, notes)


def save_calibration(calibration: Calibration, directory: str | Path) -> Path:
    path = Path(directory) / CALIBRATION_FILE
    write_json(path, calibration.to_dict())
    return path


def load_calibration(run_dir: str | Path) -> Calibration | None:
    """The calibration saved in a run directory (or the path of a calibration.json), or None."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None
    return Calibration.from_dict(data, str(path))


def apply_calibration(frame: pd.DataFrame, calibration: Calibration | None, *,
                      keep_raw: bool = True, source: str = "scores") -> pd.DataFrame:
    """A copy of `frame` whose head columns hold calibrated probabilities; the raw scores move to
    `<column>_raw` when `keep_raw`. Heads absent from the frame are skipped; with `calibration`
    None the frame is returned unchanged (so callers need no special case). Under a per-scenario
    calibration, rows of a scenario with no calibrator of its own get the global one: each such
    (head, scenario) is logged as a warning and listed in `out.attrs["calibration_notes"]`."""
    if calibration is None:
        return frame
    out = frame.copy()
    scenarios = None
    notes: list[str] = []
    if calibration.scenario_column is not None:
        if calibration.scenario_column in frame.columns:
            scenarios = frame[calibration.scenario_column].astype(str).to_numpy()
        else:
            notes.append(f"no scenario column {calibration.scenario_column!r} in {source}; "
                         "global calibrators used for every row")
    for head, head_calibration in calibration.heads.items():
        column = head_calibration.score_column
        if column not in frame.columns:
            continue
        scores = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(f"score of head {head!r} is {frame[column].iloc[row - 1]!r}, not a probability",
                            file=source, row=row, column=column)
        if keep_raw:
            out[column + RAW_SUFFIX] = scores
        out[column] = head_calibration.transform(scores, scenarios)
        for scenario, rows in head_calibration.fallback_rows(scenarios).items():
            notes.append(f"head {head!r}: {rows} rows of scenario {scenario!r} got the global calibrator "
                         "(no calibration data of their own for that scenario)")
    for note in notes:
        get_logger().warning("calibration: %s", note)
    out.attrs["calibration_notes"] = notes
    return out
