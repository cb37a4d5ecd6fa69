"""One registry of models by name, per family ("sequence" or "ranking")."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from hmtrec.errors import ConfigError

MODELS: dict[str, dict[str, Callable]] = {"sequence": {}, "ranking": {}}


def register_model(family: str, name: str):
    def wrap(builder):
        MODELS[family][name] = builder
        return builder
    return wrap


def _import_family(family: str) -> None:
    package = importlib.import_module(f"hmtrec.models.{family}")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def get_model_builder(family: str, name: str) -> Callable:
    _import_family(family)
    if name not in MODELS[family]:
        raise ConfigError(f"key 'model.name': unknown {family} model {name!r}; known: {sorted(MODELS[family])}")
    return MODELS[family][name]


def model_names(family: str) -> list[str]:
    _import_family(family)
    return sorted(MODELS[family])
