"""Benchmark suites: a base sequence config, the models to compare on it, and the seeds.

A suite is a YAML file (the built-in ones live in configs/bench/):

    name: diginetica
    title: Diginetica, SR-GNN session protocol
    config:                      # a `kind: sequence` config; model and baselines are set per run
      data: {source: diginetica-sessions}
      train: {epochs: 2, max_len: 20}
    seeds: [0, 1, 2]
    metrics: [item/Recall@20, item/MRR@20]      # table columns (level/metric of the test results)
    quality: {metric: item/MRR@20, value: 0.15}  # time to quality: first epoch whose validation reaches it
    models:
      - {label: sknn, model: {name: sknn}, deterministic: true}
      - {label: sasrec, model: {name: sasrec}, train: {lr: 0.002}}
    references:                  # published figures printed beside the measured ones
      - {label: SR-GNN, source: "Wu et al., AAAI 2019", metrics: {item/Recall@20: 0.5073}}

Any plain sequence config also works as a suite: its main model and baselines become the models.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from hmtrec.config import StrictModel, _format_validation_error, read_yaml
from hmtrec.errors import ConfigError
from hmtrec.evaluate.metrics import metric_names
from hmtrec.evaluate.ranking import EvalSettings
from hmtrec.paths import configs_dir

SUITES_DIR = configs_dir() / "bench"


class QualityTarget(StrictModel):
    metric: str = Field("item/MRR@20", description="validation metric, LEVEL/METRIC@K")
    value: float = Field(..., description="the level whose first crossing is timed")


class SuiteModel(StrictModel):
    label: str
    model: dict[str, Any] = Field(..., description="the model section: {name: ..., params}")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the suite's train section")
    group: Literal["baseline", "hiersrec", "ablation"] = "baseline"
    deterministic: bool = Field(False, description="same result for every seed (e.g. kNN): run the first seed only")
    note: str | None = None

    @field_validator("model")
    @classmethod
    def _named(cls, model: dict) -> dict:
        if "name" not in model:
            raise ValueError("needs a 'name'")
        return model


class Reference(StrictModel):
    label: str
    source: str
    metrics: dict[str, float]


class Suite(StrictModel):
    name: str
    title: str | None = None
    description: str = ""
    config: dict[str, Any] = Field(..., description="a sequence config without model/baselines")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    metrics: list[str] = Field(default_factory=lambda: ["item/Recall@20", "item/MRR@20", "item/NDCG@10"])
    quality: QualityTarget | None = None
    models: list[SuiteModel]
    references: list[Reference] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "Suite":
        labels = [model.label for model in self.models]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"model labels used twice: {duplicates}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for key in ("model", "baselines"):
            if key in self.config:
                raise ValueError(f"config.{key} is set per run from `models`; remove it from the suite config")
        self._check_metric_names()
        return self

    def _check_metric_names(self) -> None:
        # A column whose cut-off is not evaluated would show "—" in every row after hours of runs.
        try:
            ks = EvalSettings.model_validate(self.config.get("eval") or {}).ks
        except ValidationError as error:  # its keys are relative to config.eval: say so
            raise ValueError(_format_validation_error(error, "config.eval")) from None
        known = set(metric_names(ks))
        named = [("metrics", name) for name in self.metrics]
        named += [("quality.metric", self.quality.metric)] if self.quality else []
        named += [(f"references[{i}].metrics", name) for i, ref in enumerate(self.references) for name in ref.metrics]
        for where, name in named:
            level, _, metric = name.rpartition("/")
            if not level or metric not in known:
                raise ValueError(f"{where}: {name!r} is not computed; a metric is LEVEL/NAME@K with NAME@K one of "
                                 f"{sorted(known)} (config.eval.ks = {ks})")

    def select(self, labels: list[str] | None) -> list[SuiteModel]:
        if not labels:
            return list(self.models)
        known = {model.label: model for model in self.models}
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise ConfigError(f"--models: unknown model label(s) {unknown} in suite {self.name!r}; "
                              f"known: {list(known)}")
        return [known[label] for label in labels]

    def run_config(self, model: SuiteModel, seed: int, overrides: dict | None = None) -> dict:
        """The complete sequence config of one (model, seed) run."""
        config = copy.deepcopy(self.config)
        config.setdefault("kind", "sequence")
        config["model"] = {**model.model, "label": model.label}
        config["baselines"] = []
        config["train"] = {**config.get("train", {}), **model.train, "seed": seed}
        return deep_merge(config, overrides or {})


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def builtin_suites() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, a suite YAML file, or a plain sequence config file."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = SUITES_DIR / f"{name_or_path}.yaml"
        if not candidate.exists():
            raise ConfigError(f"no suite {str(name_or_path)!r}: not a file, and not a built-in suite "
                              f"({', '.join(builtin_suites())})")
        path = candidate
    raw = read_yaml(path)
    if "models" not in raw and "config" not in raw:
        raw = _suite_from_sequence_config(raw, path)
    raw.setdefault("name", path.stem)
    try:
        return Suite.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, str(path))) from None


def _suite_from_sequence_config(raw: dict, path: Path) -> dict:
    """A `kind: sequence` config as a suite: the main model and every baseline, on seeds 0, 1, 2."""
    if raw.get("kind", "sequence") != "sequence":
        raise ConfigError(f"{path}: key 'kind': only sequence configs can be benchmarked")
    config = {key: value for key, value in raw.items() if key not in ("model", "baselines")}
    models = []
    for spec in [raw.get("model", {"name": "hiersrec"}), *raw.get("baselines", [])]:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        label = spec.pop("label", spec.get("name"))
        models.append({"label": label, "model": spec})
    return {"name": path.stem, "title": f"{path.name}", "config": config, "models": models}
