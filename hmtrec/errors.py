"""Errors that users see. Each names where the problem is (file, row, column or config key)."""

from __future__ import annotations


class HmtrecError(Exception):
    """Base class of every error hmtrec raises on purpose."""


class DataError(HmtrecError):
    """Bad input data. Names the file, the (1-based, header excluded) row and the column."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.file, self.row, self.column = file, row, column
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ConfigError(HmtrecError):
    """A config key that is unknown, mistyped or inconsistent. The message names the key."""
