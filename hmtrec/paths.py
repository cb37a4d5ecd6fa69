"""Where real datasets are looked for ($HMT_DATA_DIR, else ../shared/data beside the checkout) and
where the shipped YAML configs are."""

from __future__ import annotations

import os
from pathlib import Path

from hmtrec.errors import DataError


def data_dir(path: str | Path | None = None) -> Path:
    if path is not None:
        return Path(path)
    if "HMT_DATA_DIR" in os.environ:
        return Path(os.environ["HMT_DATA_DIR"])
    for candidate in (Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise DataError("no data folder: set data.path in the config or the HMT_DATA_DIR environment variable")


def configs_dir() -> Path:
    """The YAML configs (quickstart, bench suites, ...): hmtrec/configs, which is the copy inside an
    installed wheel, or in a source tree a link to configs/ beside the package."""
    installed = Path(__file__).resolve().parent / "configs"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[1] / "configs"
