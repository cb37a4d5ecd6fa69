"""The names of the data sources (light to import: the CLI offers them as choices)."""

from __future__ import annotations

from typing import Literal

Source = Literal["synthetic", "generic", "diginetica", "diginetica-sessions", "movielens-1m",
                 "movielens-100k", "foursquare-nyc",
                 "prepared"]  # a folder written by `hmtrec prepare` (hmtrec.data.streaming)
