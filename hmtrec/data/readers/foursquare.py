"""Foursquare NYC check-ins (Yang et al., 2015) in the STAN release: `stan_NYC_checkins.csv(.gz)`
(user, poi, time_min = minutes since the first check-in) and `stan_NYC_poi_coords.csv`
(poi, lat, lon). Sequences are users' check-ins in time order; the taxonomy is geographic,
region ⊃ cell ⊃ venue, cut from the coordinates by `hmtrec.data.geo`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmtrec.data.geo import geo_taxonomy
from hmtrec.data.readers import SourceData, find_file, source_folder
from hmtrec.data.schema import map_items, read_table, require_columns, require_present, parse_time
from hmtrec.data.validation import check_coordinates, first_line_of

SECONDS_PER_MINUTE = 60.0


def read_venues(folder, settings=None, warnings=None) -> tuple[pd.DataFrame, str]:
    """Venue coordinates: every missing or out-of-range coordinate is named in one error; venues
    far outside the data's own extent (e.g. latitude and longitude swapped) are reported."""
    path = find_file(folder, "stan_NYC_poi_coords.csv", "stan_NYC_poi_coords.csv.gz")
    venues = read_table(path, string_columns=["poi"], settings=settings, warnings=warnings)
    require_columns(venues, ["poi", "lat", "lon"], str(path))
    require_present(venues, "poi", str(path))
    lat, lon = (pd.to_numeric(venues[c], errors="coerce").to_numpy(dtype=np.float64) for c in ("lat", "lon"))
    check_coordinates(venues["poi"].to_numpy(dtype=object), lat, lon, file=str(path), columns=("poi", "lat", "lon"),
                      settings=settings, warnings=warnings)
    return venues, str(path)


def read_checkins(folder, taxonomy, settings=None, warnings=None) -> pd.DataFrame:
    """Canonical events (sequence = user, leaf, time in seconds) in file order."""
    path = find_file(folder, "stan_NYC_checkins.csv.gz", "stan_NYC_checkins.csv")
    file = str(path)
    checkins = read_table(path, string_columns=["poi"], settings=settings, warnings=warnings)
    require_columns(checkins, ["user", "poi", "time_min"], file)
    require_present(checkins, "user", file)
    require_present(checkins, "poi", file)
    minutes = parse_time(checkins["time_min"], "order", file=file, column="time_min")
    leaves = map_items(checkins["poi"].astype(str).str.strip().to_numpy(dtype=object), taxonomy,
                       file=file, column="poi", first_line=first_line_of(checkins))
    return pd.DataFrame({"sequence": checkins["user"].to_numpy(), "leaf": leaves,
                         "time": minutes * SECONDS_PER_MINUTE})


def read(cfg) -> SourceData:
    folder = source_folder(cfg, "foursquare-nyc")
    warnings: list[str] = []
    venues, venue_file = read_venues(folder, cfg.validation, warnings)
    geo = cfg.geo
    sizes = {"grid": dict(cell_km=geo.cell_km, region_factor=geo.region_factor),
             "geohash": dict(geohash_precision=geo.geohash_precision, region_precision=geo.region_precision),
             "kmeans": dict(n_cells=geo.n_cells, n_regions=geo.n_regions, seed=cfg.seed)}[geo.method]
    taxonomy = geo_taxonomy(venues["poi"].astype(str).str.strip(), venues["lat"], venues["lon"], geo.method,
                            file=venue_file, **sizes)
    events = read_checkins(folder, taxonomy, cfg.validation, warnings)
    note = (f"foursquare-nyc: geo taxonomy by {geo.method} "
            f"({', '.join(f'{k}={v}' for k, v in sizes.items())}); time = minutes since the first check-in x 60")
    return SourceData(name="foursquare-nyc", events=events, taxonomy=taxonomy, notes=[note], warnings=warnings)


__all__ = ["read", "read_venues", "read_checkins"]
