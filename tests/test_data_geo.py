"""Geographic taxonomies and the Foursquare NYC reader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmtrec.data.geo import geo_levels, geo_taxonomy, geohash
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.errors import DataError


def _venues(n=600, seed=0):
    rng = np.random.default_rng(seed)
    lat = 40.70 + 0.12 * rng.random(n)
    lon = -74.02 + 0.15 * rng.random(n)
    return np.array([f"v{i}" for i in range(n)], dtype=object), lat, lon


def test_geohash_matches_the_reference_encoding():
    # reference values from the geohash definition (e.g. the classic "u4pruydqqvj" example)
    assert geohash(np.array([57.64911]), np.array([10.40744]), 11)[0] == "u4pruydqqvj"
    assert geohash(np.array([40.758896]), np.array([-73.985130]), 7)[0] == "dr5ru7v"
    assert geohash(np.array([-33.8688]), np.array([151.2093]), 5)[0] == "r3gx2"


@pytest.mark.parametrize("method,sizes", [
    ("grid", dict(cell_km=1.0, region_factor=4)),
    ("geohash", dict(geohash_precision=6, region_precision=4)),
    ("kmeans", dict(n_cells=40, n_regions=6)),
])
def test_every_venue_in_one_cell_and_one_region_independent_of_row_order(method, sizes):
    ids, lat, lon = _venues()
    taxonomy = geo_taxonomy(ids, lat, lon, method, **sizes)
    assert taxonomy.level_names == ["region", "cell", "venue"]
    assert taxonomy.n_leaves == 600
    assert taxonomy.n_nodes("region") < taxonomy.n_nodes("cell") < 600
    perm = np.random.default_rng(1).permutation(600)
    shuffled = geo_taxonomy(ids[perm], lat[perm], lon[perm], method, **sizes)
    assert shuffled.to_dict() == taxonomy.to_dict()
    # nesting: the region of a venue is the region of its cell (a function of the cell)
    cell, region = taxonomy.ancestor_table("cell"), taxonomy.ancestor_table("region")
    frame = pd.DataFrame({"cell": cell, "region": region})
    assert frame.groupby("cell")["region"].nunique().max() == 1


def test_grid_cells_have_the_requested_size():
    ids, lat, lon = _venues(2_000)
    regions, cells = geo_levels(lat, lon, "grid", cell_km=2.0, region_factor=3)
    frame = pd.DataFrame({"cell": cells, "lat": lat, "lon": lon, "region": regions})
    spread = frame.groupby("cell").agg(dlat=("lat", lambda v: v.max() - v.min()),
                                       dlon=("lon", lambda v: v.max() - v.min()))
    km_lat = spread["dlat"].max() * 111.32
    km_lon = spread["dlon"].max() * 111.32 * np.cos(np.radians(40.8))
    assert 1.5 < km_lat <= 2.0 + 1e-9 and 1.5 < km_lon <= 2.0 + 0.02
    # a region is at most 3 x 3 cells
    assert frame.groupby("region")["cell"].nunique().max() <= 9
    region_spread = frame.groupby("region")["lat"].agg(lambda v: v.max() - v.min()).max() * 111.32
    assert 4.0 < region_spread <= 6.0 + 1e-9


def test_kmeans_uses_the_requested_number_of_clusters_and_is_spatially_compact():
    ids, lat, lon = _venues(1_000)
    taxonomy = geo_taxonomy(ids, lat, lon, "kmeans", n_cells=50, n_regions=5, seed=0)
    assert taxonomy.n_nodes("cell") == 50 and taxonomy.n_nodes("region") == 5
    cell = taxonomy.ancestor_table("cell")
    order = taxonomy.index_of(ids)  # leaf index of each input venue
    within = np.mean([np.std(lat[cell[order] == c]) for c in range(50)])
    assert within < 0.3 * np.std(lat)


def test_bad_coordinates_and_moved_venues_are_errors():
    ids, lat, lon = _venues(10)
    bad_lat = lat.copy()
    bad_lat[4] = 123.0
    with pytest.raises(DataError, match=r"file venues.csv, row 5, column 'lat'.*within ±90"):
        geo_taxonomy(ids, bad_lat, lon, file="venues.csv")
    bad_lon = lon.astype(object)
    bad_lon[2] = "east"
    bad_lon[6] = None
    with pytest.raises(DataError, match=r"row 3, column 'lon'.*2 rows in all: row 3 'east', row 7 None"):
        geo_taxonomy(ids, lat, bad_lon)
    twice = np.r_[ids, ids[:1]]
    with pytest.raises(DataError, match=r"row 11.*'v0' has two locations"):
        geo_taxonomy(twice, np.r_[lat, lat[0] + 0.5], np.r_[lon, lon[0]])
    # listing a venue twice at the same place is fine
    assert geo_taxonomy(twice, np.r_[lat, lat[0]], np.r_[lon, lon[0]]).n_leaves == 10


def test_foursquare_nyc_reader_and_time_split(data_dir):
    prepared = load_data(DataConfig(source="foursquare-nyc", path=str(data_dir / "foursquare-nyc")))
    taxonomy = prepared.taxonomy
    assert taxonomy.level_names == ["region", "cell", "venue"]
    assert taxonomy.n_leaves == 5_135
    train, valid, test = prepared.train, prepared.valid, prepared.test
    cut_valid, cut_test = prepared.info["cutoffs"]["valid"], prepared.info["cutoffs"]["test"]
    raw = pd.read_csv(data_dir / "foursquare-nyc" / "stan_NYC_checkins.csv.gz")
    seconds = raw["time_min"].to_numpy() * 60.0
    assert train.n_events == int((seconds < cut_valid).sum())
    assert train.n_sequences == raw.loc[seconds < cut_valid, "user"].nunique()
    assert test.n_events == len(raw[raw["user"].isin(set(test.sequence_ids))])
    # no leakage: training ends before the valid period, test targets lie in the test period,
    # and every test sequence's inputs are that user's earlier check-ins
    assert train.timestamps.max() < cut_valid
    assert test.timestamps[test.targets()].min() >= cut_test
    assert valid.timestamps[valid.targets()].min() >= cut_valid
    assert valid.timestamps.max() < cut_test
    # the last 10% of the time range holds roughly 10k test targets (as in the GETNext split)
    assert 8_000 < test.n_targets < 12_000
    for s in range(0, test.n_sequences, 97):
        times = test.timestamps[test.offsets[s]:test.offsets[s + 1]]
        assert np.all(np.diff(times) >= 0)
