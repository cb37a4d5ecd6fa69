"""Typed configuration: YAML files validated by pydantic models, overridable with `key=value`.

Each family (sequence, ranking, ...) declares its own top-level model and registers it under a
`kind`; a config file says which kind it is. Unknown or mistyped keys are errors naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from hmtrec.errors import ConfigError


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


CONFIG_KINDS: dict[str, type[StrictModel]] = {}


def register_config(kind: str) -> Callable[[type[StrictModel]], type[StrictModel]]:
    def wrap(cls: type[StrictModel]) -> type[StrictModel]:
        CONFIG_KINDS[kind] = cls
        return cls
    return wrap


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted_key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); values are parsed as YAML so numbers, booleans and lists work."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else "")) 
    return parsed


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif not key:  # a check across keys: its message names them, and the input is the whole file
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"key {key!r}: {item['msg']} (got {item.get('input')!r})")
    return f"{source}: invalid config: " + "; ".join(lines)


def build_config(raw: dict, source: str = "config") -> StrictModel:
    """Validate a raw mapping into the model registered for its `kind`."""
    _import_config_models()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping")
    kind = raw.get("kind", "sequence")
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"{source}: key 'kind': unknown kind {kind!r}; known: {sorted(CONFIG_KINDS)}")
    try:
        # a relative data.path left by now (from --set, or a mapping built in code) is relative to the
        # working directory: made absolute, so a run's config.yaml reads the same data from anywhere
        return CONFIG_KINDS[kind].model_validate(_absolute_data_path(raw, Path.cwd()))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def _absolute_data_path(raw: dict, base: Path) -> dict:
    """`raw` with a relative `data.path` resolved against `base`."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"] \
            and not Path(data["path"]).expanduser().is_absolute():
        return {**raw, "data": {**data, "path": str((base / data["path"]).resolve())}}
    return raw


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a syntax error is one line naming the file, line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: cannot read the config ({reason})") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}"
                          + (f" ({context})" if context else "")) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    return loaded


def resolve_data_path(raw: dict, config_path: Path) -> dict:
    """A relative `data.path` in a config file is relative to the file's folder (so a config and
    its data can move together); `--set data.path=...` is relative to the working directory."""
    return _absolute_data_path(raw, config_path.parent)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict | None = None) -> StrictModel:
    """Read YAML (or start from `base`), apply `--set` overrides, validate."""
    raw: dict = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        raw.update(resolve_data_path(read_yaml(path), path))
        source = str(path)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    return build_config(raw, source)


def dump_config(config: StrictModel, path: str | Path) -> None:
    """Write the resolved config (its data.path is absolute: `build_config`), atomically, so a reader
    never sees half a config."""
    from hmtrec.rundir import write_text

    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# Where each config kind's module is: it registers the kind's config model (here) and its part of
# the run lifecycle (hmtrec.lifecycle). Found by name, so nothing below the kinds imports them.
KIND_MODULES = {"sequence": "hmtrec.pipelines.sequence", "ranking": "hmtrec.pipelines.ranking",
                "geo": "hmtrec.pipelines.geo"}


def _import_config_models() -> None:
    """Config models register themselves on import; import every family that exists."""
    import importlib

    for module in KIND_MODULES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
