"""A small synthetic destination log for the geo tests: regions ⊃ cells ⊃ venues, users with a
home region and favourite cells who act every day or two, with occasional trips elsewhere."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmtrec.data.actions import DAY_SECONDS
from hmtrec.data.sequences import SequenceData
from hmtrec.data.taxonomy import Taxonomy


def geo_taxonomy(n_regions=4, cells_per_region=5, venues_per_cell=3) -> Taxonomy:
    rows = [(f"r{r}", f"r{r}c{c}", f"r{r}c{c}v{v}")
            for r in range(n_regions) for c in range(cells_per_region) for v in range(venues_per_cell)]
    return Taxonomy.from_table(pd.DataFrame(rows, columns=["region", "cell", "venue"]), ["region", "cell", "venue"])


def destination_log(taxonomy: Taxonomy, *, n_users=60, days=120, seed=0, types=("check-in",)) -> SequenceData:
    """Each user has a home region and 2 favourite cells in it; 85% of actions go to a favourite
    cell, the rest anywhere. Event types, when several, are drawn at random."""
    rng = np.random.default_rng(seed)
    cell_of_leaf = taxonomy.ancestor_table("cell")
    region_of_cell = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes("cell")), "cell", "region")
    leaves, times, offsets, kinds = [], [], [0], []
    for _ in range(n_users):
        home = rng.integers(taxonomy.n_nodes("region"))
        favourites = rng.choice(np.flatnonzero(region_of_cell == home), 2, replace=False)
        n = int(rng.integers(days // 2, days))
        user_times = np.sort(rng.uniform(0, days, n)) * DAY_SECONDS
        at_home = rng.random(n) < 0.85
        cells = np.where(at_home, rng.choice(favourites, n, p=[0.7, 0.3]), rng.integers(taxonomy.n_nodes("cell"), size=n))
        venue = np.array([rng.choice(np.flatnonzero(cell_of_leaf == c)) for c in cells])
        leaves.append(venue)
        times.append(user_times)
        kinds.append(rng.integers(len(types), size=n))
        offsets.append(offsets[-1] + n)
    event_types = np.concatenate(kinds) if len(types) > 1 else None
    return SequenceData(np.concatenate(leaves), np.array(offsets), np.array([f"u{i}" for i in range(n_users)]),
                        timestamps=np.concatenate(times), event_types=event_types,
                        event_type_names=list(types) if len(types) > 1 else [])


def split_by_time(log: SequenceData, cut_days: float) -> tuple[SequenceData, SequenceData]:
    """(train: events before the cut, all targets; test: every event, targets after the cut)."""
    before = log.timestamps < cut_days * DAY_SECONDS
    train = log.keep_events(before)
    return train.with_targets(train.positions() > 0), log.with_targets(~before)
