"""Geographic taxonomies from venue coordinates: region ⊃ cell ⊃ venue.

Three ways to cut the map, all deterministic (same venues -> same tree, whatever the row order)
and nested by construction (a region is computed from its cell, never separately):

- "grid": square cells of `cell_km` on an equirectangular grid anchored at (0°, 0°); a region
  is a block of `region_factor` x `region_factor` cells.
- "geohash": cells are geohashes of `geohash_precision` characters; a region is the prefix of
  `region_precision` characters.
- "kmeans": cells are k-means clusters of venues (`n_cells`), regions are k-means clusters of the
  cell centres (`n_regions`, weighted by venues per cell).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd

from hmtrec.data.taxonomy import Taxonomy
from hmtrec.data.validation import offender_error
from hmtrec.errors import DataError

KM_PER_DEGREE = 111.32  # length of one degree of latitude (and of longitude at the equator)
GeoMethod = Literal["grid", "geohash", "kmeans"]
_BASE32 = np.array(list("0123456789bcdefghjkmnpqrstuvwxyz"))


def validate_coordinates(venue_ids: Sequence, lat, lon, *, file: str | None = None,
                         columns: tuple[str, str, str] = ("venue", "lat", "lon")
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique venues sorted by id, with their coordinates. Raises DataError (file, row, column)
    for a missing or out-of-range coordinate and for a venue listed with two locations."""
    ids = np.asarray(pd.Series(venue_ids).astype(str).to_numpy(), dtype=object)
    raw = {columns[1]: np.asarray(lat, dtype=object), columns[2]: np.asarray(lon, dtype=object)}
    lat = pd.to_numeric(pd.Series(lat), errors="coerce").to_numpy(dtype=np.float64)
    lon = pd.to_numeric(pd.Series(lon), errors="coerce").to_numpy(dtype=np.float64)
    for values, column, limit in ((lat, columns[1], 90.0), (lon, columns[2], 180.0)):
        bad = ~np.isfinite(values) | (np.abs(values) > limit)
        if bad.any():
            raise offender_error(f"coordinate must be a number within ±{limit:g}", np.flatnonzero(bad),
                                 raw[column], file=file, column=column, first_line=None)
    order = np.argsort(ids, kind="stable")
    ids, lat, lon = ids[order], lat[order], lon[order]
    first = np.r_[True, ids[1:] != ids[:-1]]
    group = np.cumsum(first) - 1
    moved = (lat != lat[first][group]) | (lon != lon[first][group])
    if moved.any():
        positions = np.flatnonzero(moved)
        position = int(positions[0])
        raise offender_error(f"venue {ids[position]!r} has two locations "
                             f"({lat[first][group[position]]}, {lon[first][group[position]]}) and "
                             f"({lat[position]}, {lon[position]})", np.arange(len(positions)), ids[positions],
                             rows=order[positions] + 1, file=file, column=columns[1], first_line=None)
    return ids[first], lat[first], lon[first]


def reference_latitude(lat: np.ndarray) -> float:
    """Latitude at which longitude degrees are converted to km: the median, rounded to 0.1°."""
    return float(np.round(np.median(lat), 1))


def grid_cells(lat: np.ndarray, lon: np.ndarray, *, cell_km: float, region_factor: int,
               ref_lat: float) -> tuple[np.ndarray, np.ndarray]:
    """(region label, cell label) per point on a fixed grid anchored at (0°, 0°)."""
    lat_step = cell_km / KM_PER_DEGREE
    lon_step = cell_km / (KM_PER_DEGREE * max(np.cos(np.radians(ref_lat)), 1e-6))
    row = np.floor(lat / lat_step).astype(np.int64)
    col = np.floor(lon / lon_step).astype(np.int64)
    region_row, region_col = np.floor_divide(row, region_factor), np.floor_divide(col, region_factor)
    cell = pd.Series(row).astype(str) + "_" + pd.Series(col).astype(str)
    region = pd.Series(region_row).astype(str) + "_" + pd.Series(region_col).astype(str)
    return ("R" + region).to_numpy(dtype=object), ("C" + cell).to_numpy(dtype=object)


def geohash(lat: np.ndarray, lon: np.ndarray, precision: int) -> np.ndarray:
    """Standard geohash strings, vectorised (bits interleaved longitude first, base32)."""
    n_bits = 5 * precision
    lon_bits, lat_bits = (n_bits + 1) // 2, n_bits // 2
    lon_int = np.minimum(((np.asarray(lon) + 180.0) / 360.0 * (1 << lon_bits)).astype(np.int64), (1 << lon_bits) - 1)
    lat_int = np.minimum(((np.asarray(lat) + 90.0) / 180.0 * (1 << lat_bits)).astype(np.int64), (1 << lat_bits) - 1)
    code = np.zeros(len(lon_int), dtype=np.int64)
    for bit in range(n_bits):  # bit 0 is the most significant; even bits are longitude
        if bit % 2 == 0:
            value = (lon_int >> (lon_bits - 1 - bit // 2)) & 1
        else:
            value = (lat_int >> (lat_bits - 1 - bit // 2)) & 1
        code = (code << 1) | value
    chars = [_BASE32[(code >> (5 * (precision - 1 - i))) & 31] for i in range(precision)]
    out = chars[0].astype(object)
    for column in chars[1:]:
        out = out + column.astype(object)
    return out


def kmeans_cells(lat: np.ndarray, lon: np.ndarray, *, n_cells: int, n_regions: int, ref_lat: float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(region label, cell label) per point from two nested k-means runs. Input must already be
    in a canonical order (validate_coordinates sorts by venue id), which makes it deterministic."""
    from sklearn.cluster import KMeans

    points = np.column_stack([lat, lon * np.cos(np.radians(ref_lat))])
    n_distinct = len(np.unique(points, axis=0))
    n_cells = min(n_cells, n_distinct)
    cell = KMeans(n_clusters=n_cells, n_init=1, random_state=seed).fit(points).labels_
    sizes = np.bincount(cell, minlength=n_cells)
    centres = np.column_stack([np.bincount(cell, weights=points[:, d], minlength=n_cells) for d in (0, 1)])
    centres /= sizes[:, None]
    n_regions = min(n_regions, n_cells)
    region_of_cell = KMeans(n_clusters=n_regions, n_init=1, random_state=seed).fit(
        centres, sample_weight=sizes).labels_
    # Name clusters by their centre's position, so labels read south-west to north-east.
    cell_rank = _rank_by_position(centres)
    region_sizes = np.bincount(region_of_cell, weights=sizes, minlength=n_regions)
    region_centres = np.column_stack([np.bincount(region_of_cell, weights=centres[:, d] * sizes, minlength=n_regions)
                                      for d in (0, 1)]) / region_sizes[:, None]
    region_rank = _rank_by_position(region_centres)
    cell_labels = np.array([f"K{cell_rank[c]:04d}" for c in range(n_cells)], dtype=object)
    region_labels = np.array([f"KR{region_rank[r]:03d}" for r in range(n_regions)], dtype=object)
    return region_labels[region_of_cell[cell]], cell_labels[cell]


def _rank_by_position(centres: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.round(centres[:, 1], 6), np.round(centres[:, 0], 6)))
    rank = np.empty(len(centres), dtype=np.int64)
    rank[order] = np.arange(len(centres))
    return rank


def geo_levels(lat: np.ndarray, lon: np.ndarray, method: GeoMethod = "grid", *, cell_km: float = 1.0,
               region_factor: int = 8, geohash_precision: int = 6, region_precision: int = 4,
               n_cells: int = 400, n_regions: int = 20, ref_lat: float | None = None,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(region label, cell label) of each point. For "kmeans", pass points in a canonical order."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    ref = reference_latitude(lat) if ref_lat is None else ref_lat
    if method == "grid":
        if region_factor < 2:
            raise ValueError("region_factor must be >= 2")
        return grid_cells(lat, lon, cell_km=cell_km, region_factor=region_factor, ref_lat=ref)
    if method == "geohash":
        if not 1 <= region_precision < geohash_precision:
            raise ValueError("need 1 <= region_precision < geohash_precision")
        cells = geohash(lat, lon, geohash_precision)
        regions = np.array([c[:region_precision] for c in cells], dtype=object)
        return regions, cells
    if method == "kmeans":
        return kmeans_cells(lat, lon, n_cells=n_cells, n_regions=n_regions, ref_lat=ref, seed=seed)
    raise ValueError(f"unknown geo method {method!r}; use grid, geohash or kmeans")


def geo_taxonomy(venue_ids: Sequence, lat, lon, method: GeoMethod = "grid", *,
                 level_names: Sequence[str] = ("region", "cell", "venue"), file: str | None = None,
                 **sizes) -> Taxonomy:
    """Taxonomy region ⊃ cell ⊃ venue. Every venue lies in exactly one cell and one region; a
    venue listed twice must have one location. `sizes`: the keyword settings of `geo_levels`
    (cell_km, region_factor, geohash_precision, region_precision, n_cells, n_regions, seed)."""
    if len(level_names) != 3:
        raise ValueError("a geo taxonomy has 3 levels: region, cell, venue")
    ids, lat, lon = validate_coordinates(venue_ids, lat, lon, file=file)
    regions, cells = geo_levels(lat, lon, method, **sizes)
    table = pd.DataFrame({level_names[0]: regions, level_names[1]: cells, level_names[2]: ids})
    return Taxonomy.from_table(table, list(level_names), file=file)


def leaf_coordinates(taxonomy: Taxonomy, venue_ids: Sequence, lat, lon, *, file: str | None = None) -> np.ndarray:
    """[n_leaves, 2] (latitude, longitude) of every leaf of a geo taxonomy, from a venue table
    (validated like `geo_taxonomy`'s input). Every leaf must be in the table."""
    ids, lat, lon = validate_coordinates(venue_ids, lat, lon, file=file)
    position = {venue: row for row, venue in enumerate(ids)}
    labels = taxonomy.labels_of(np.arange(taxonomy.n_leaves))
    missing = [str(label) for label in labels if str(label) not in position]
    if missing:
        raise DataError(f"{len(missing)} venues of the taxonomy have no coordinates (first: {missing[0]!r})", file=file)
    rows = np.array([position[str(label)] for label in labels], dtype=np.int64)
    return np.column_stack([lat[rows], lon[rows]])
