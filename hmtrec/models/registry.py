"""One registry of models by name, per family ("sequence" or "ranking").

A model registers a builder and the pydantic class of its parameters; the config's `model:`
section is validated against that class, so an unknown or mistyped model key is an error naming it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from hmtrec.config import StrictModel, _format_validation_error
from hmtrec.errors import ConfigError


@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., Any]
    params: type[StrictModel]


MODELS: dict[str, dict[str, ModelEntry]] = {"sequence": {}, "ranking": {}}


def register_model(family: str, name: str, params: type[StrictModel]):
    """Decorator for a builder `builder(params, **context) -> model`."""
    def wrap(builder):
        MODELS[family][name] = ModelEntry(name, builder, params)
        return builder
    return wrap


def _import_family(family: str) -> None:
    package = importlib.import_module(f"hmtrec.models.{family}")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def get_model(family: str, name: str) -> ModelEntry:
    _import_family(family)
    if name not in MODELS[family]:
        raise ConfigError(f"key 'model.name': unknown {family} model {name!r}; known: {sorted(MODELS[family])}")
    return MODELS[family][name]


def validate_model_params(family: str, section: dict) -> tuple[ModelEntry, StrictModel]:
    """`section` is the config's model mapping: {name: ..., <params>}. Returns the entry and
    validated params; errors name the key as model.<key>."""
    section = dict(section)
    name = section.pop("name", None)
    if name is None:
        raise ConfigError("key 'model.name' is required")
    entry = get_model(family, name)
    try:
        return entry, entry.params.model_validate(section)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, f"model {name!r}").replace("key '", "key 'model.")) from None


def model_names(family: str) -> list[str]:
    _import_family(family)
    return sorted(MODELS[family])


def build_model(entry: ModelEntry, params: StrictModel, **context) -> Any:
    """Call `entry.builder(params, **context)` with only the context keys the builder declares (all
    of them when it takes **kwargs), so a pipeline can offer more context (max_len, run_dir, ...)
    than an older builder knows about."""
    parameters = inspect.signature(entry.builder).parameters.values()
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        names = {parameter.name for parameter in parameters}
        context = {key: value for key, value in context.items() if key in names}
    return entry.builder(params, **context)


def with_keys_added_since(section: Any) -> Any:
    """A model mapping from a saved run's config, with every parameter added to that model since the
    run was saved filled in as the run behaved (the params class's `behaviour_before_added`), so that
    a changed default does not silently change what an old run directory means. Anything that is not
    a known model's mapping is returned as it is (validation reports it)."""
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        return section
    for family in MODELS:
        _import_family(family)
        entry = MODELS[family].get(section["name"])
        if entry is not None:
            added = getattr(entry.params, "behaviour_before_added", {})
            return {**{key: value for key, value in added.items() if key not in section}, **section}
    return section


def saved_config_as_trained(raw: dict) -> dict:
    """A saved run config (the mapping of config.yaml) with with_keys_added_since applied to its
    model and to every baseline."""
    raw = dict(raw)
    if "model" in raw:
        raw["model"] = with_keys_added_since(raw["model"])
    if isinstance(raw.get("baselines"), list):
        raw["baselines"] = [with_keys_added_since(spec) for spec in raw["baselines"]]
    return raw


def post_training_keys(family: str, section: dict) -> tuple[str, ...]:
    """The config keys of `section`'s model fitted after training (its params class's
    `post_training_keys`, as `model.<key>`): what `hmtrec refit` may change on trained weights."""
    _, params = validate_model_params(family, section)
    return tuple(f"model.{key}" for key in getattr(type(params), "post_training_keys", ()))
