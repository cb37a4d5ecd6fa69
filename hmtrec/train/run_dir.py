"""A run directory holds everything one run produced: resolved config, checkpoint, weights,
vocabularies (JSON), metrics JSON and a log. Nothing in it is a pickle."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LOGGER_NAME = "hmtrec"


def atomic_write_bytes(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes files private; a run's files are not
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
    atomic_write_bytes(path, write)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    atomic_write_bytes(path, lambda temporary: save_file(tensors, temporary))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_tensors(path: str | Path, data: dict) -> None:
    """torch.save of tensors and plain containers only, read back with weights_only=True."""
    atomic_write_bytes(path, lambda temporary: torch.save(data, temporary))


def load_tensors(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def open_run_dir(path: str | Path) -> Path:
    """Create the folder and attach its log.txt to the hmtrec logger."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    log_file = str((path / "log.txt").resolve())
    if not any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return path


def close_run_dir(path: str | Path) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    log_file = str((Path(path) / "log.txt").resolve())
    for handler in list(logger.handlers):
        if getattr(handler, "baseFilename", None) == log_file:
            handler.close()
            logger.removeHandler(handler)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
