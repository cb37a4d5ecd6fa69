"""Geo evaluation: Acc@K / MRR per level, active vs dormant, frequency buckets, violation rate."""

import math

import numpy as np
import pytest
import torch

from geo_synthetic import geo_taxonomy
from hmtrec.data.actions import ACTIVE, DORMANT, ActionStreams, ExampleSettings, Examples
from hmtrec.data.sequences import SequenceData
from hmtrec.evaluate.geo import (GeoEvalSettings, evaluate_geo, frequency_bucket_names, geo_rows, rank_metrics,
                                 violation_rates)
from hmtrec.models.sequence.base import SequenceRecommender


def test_rank_metrics_by_hand():
    metrics = rank_metrics(np.array([1, 2, 6, math.inf]), [1, 5])
    assert metrics == {"Acc@1": 0.25, "Acc@5": 0.5, "MRR": pytest.approx((1 + 0.5 + 1 / 6 + 0) / 4)}
    assert math.isnan(rank_metrics(np.array([]), [1])["MRR"])


def test_violation_rate_counts_top_cells_outside_the_top_region():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=1)   # cells 0,1 in r0; 2,3 in r1
    tops = {"region": np.array([0, 0, 1, 1]), "cell": np.array([1, 2, 3, 0])}
    assert violation_rates(taxonomy, tops) == {"cell_in_region": 0.5}
    assert violation_rates(taxonomy, tops, np.array([0, 2])) == {"cell_in_region": 0.0}


def test_frequency_bucket_names():
    assert frequency_bucket_names([10, 100]) == ["<10", "10-99", ">=100"]


def test_evaluate_geo_on_known_scores():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=1)
    # one user with a single old action, so every example has history
    log = SequenceData(np.array([0]), np.array([0, 1]), np.array(["u"]), timestamps=np.array([0.0]))
    n = 4
    # example i is predicted i + 1 days ahead, so a model can tell the rows apart by `lead_days`
    examples = Examples(user=np.zeros(n, dtype=np.int64), time=np.full(n, 10.0 * 86_400),
                        target=np.array([0, 1, 2, 3]), target_time=(np.arange(n) + 11.0) * 86_400,
                        kind=np.array([ACTIVE, ACTIVE, DORMANT, DORMANT], dtype=np.int8))
    region_scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]).log()
    cell_scores = torch.tensor([[0.5, 0.3, 0.1, 0.1],     # target 0: rank 1, top cell 0 in top region 0
                                [0.4, 0.3, 0.2, 0.1],     # target 1: rank 2, top cell 0 outside top region 1
                                [0.1, 0.2, 0.3, 0.4],     # target 2: rank 2, top cell 3 outside top region 0
                                [0.1, 0.2, 0.3, 0.4]]).log()  # target 3: rank 1

    class Fixed(SequenceRecommender):
        levels = ["region", "cell"]

        def predict(self, batch):
            row = torch.round(batch["lead_days"]).long() - 1
            return {"region": region_scores[row], "cell": cell_scores[row]}

    streams = ActionStreams(log, ExampleSettings())

    model = Fixed(taxonomy)
    train_leaves = np.array([0] * 30 + [1] * 5 + [2] * 12 + [3])   # cell frequencies 30, 5, 12, 1
    results = evaluate_geo(model, streams, examples, GeoEvalSettings(ks=[1, 2], frequency_edges=[10, 20], batch_size=3),
                           train_leaves=train_leaves)
    assert results["n_examples"] == 4 and results["counts"] == {"active": 2, "dormant": 2}
    # region targets 0,0,1,1: ranks 1, 2, 2, 1
    assert results["overall"]["region"] == {"Acc@1": 0.5, "Acc@2": 1.0, "MRR": 0.75}
    assert results["overall"]["cell"] == {"Acc@1": 0.5, "Acc@2": 1.0, "MRR": 0.75}
    assert results["by_kind"]["active"]["cell"] == {"Acc@1": 0.5, "Acc@2": 1.0, "MRR": 0.75}
    assert results["by_kind"]["dormant"]["region"]["Acc@1"] == 0.5
    assert results["violation_rate"] == {"cell_in_region": 0.5}
    assert results["violation_rate_by_kind"] == {"active": {"cell_in_region": 0.5}, "dormant": {"cell_in_region": 0.5}}
    buckets = results["by_frequency"]["buckets"]
    assert {name: bucket["n"] for name, bucket in buckets.items()} == {"<10": 2, "10-19": 1, ">=20": 1}
    assert buckets["<10"]["cell"]["Acc@1"] == 0.5            # targets 1 (rank 2) and 3 (rank 1)
    assert buckets[">=20"]["cell"]["MRR"] == 1.0
    rows = geo_rows({"m": results}, "by_frequency")
    assert len(rows) == 6 and rows[0]["n"] == 2
