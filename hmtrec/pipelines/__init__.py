"""Pipelines tie a config kind to its training and evaluation: `hmtrec train` reads the config's
`kind` and hands it to the pipeline registered for it. Each family lives in its own module."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Protocol

from hmtrec.errors import ConfigError


class Pipeline(Protocol):
    def train(self, config: Any, run_dir: Path) -> dict: ...

    def evaluate(self, run_dir: Path, overrides: list[str]) -> dict: ...


PIPELINES: dict[str, Callable[[], Pipeline]] = {}
PIPELINE_MODULES = {"sequence": "hmtrec.pipelines.sequence", "ranking": "hmtrec.pipelines.ranking",
                    "geo": "hmtrec.pipelines.geo"}


def register_pipeline(kind: str):
    def wrap(factory):
        PIPELINES[kind] = factory
        return factory
    return wrap


def get_pipeline(kind: str) -> Pipeline:
    if kind not in PIPELINES and kind in PIPELINE_MODULES:
        importlib.import_module(PIPELINE_MODULES[kind])
    if kind not in PIPELINES:
        raise ConfigError(f"key 'kind': no pipeline for {kind!r}; known: {sorted(PIPELINE_MODULES)}")
    return PIPELINES[kind]()
