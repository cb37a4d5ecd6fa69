"""Region + city suggestions: every suggested city lies in a suggested region, with joint probabilities."""

import numpy as np
import pytest
import torch

from geo_synthetic import geo_taxonomy
from hmtrec.serve.geo_suggest import nested_suggestions, suggestions_to_json


def test_suggested_cities_lie_inside_their_regions_with_joint_probabilities():
    torch.manual_seed(0)
    taxonomy = geo_taxonomy(n_regions=5, cells_per_region=4, venues_per_cell=1)
    parent = torch.from_numpy(taxonomy.node_ancestors(np.arange(20), "cell", "region"))
    # heads that disagree on purpose: the region head and the city head are drawn independently
    region_log_p = torch.log_softmax(torch.randn(50, 5) * 2, 1)
    cell_log_p = torch.log_softmax(torch.randn(50, 20) * 2, 1)
    nested = nested_suggestions(region_log_p, cell_log_p, parent, k_coarse=3, k_fine=3)
    region_p, cell_p = region_log_p.exp(), cell_log_p.exp()
    for q in range(50):
        expected_regions = torch.argsort(region_p[q], descending=True)[:3]
        assert nested.coarse[q].tolist() == expected_regions.tolist()
        for j, region in enumerate(nested.coarse[q].tolist()):
            cells = nested.fine[q, j].tolist()
            assert all(parent[c] == region for c in cells)                      # consistent by construction
            inside = torch.nonzero(parent == region).flatten()
            best = inside[torch.argsort(cell_p[q, inside], descending=True)[:3]]
            assert cells == best.tolist()
            mass = cell_p[q, inside].sum()
            torch.testing.assert_close(nested.fine_conditional[q, j], cell_p[q, best] / mass)
            torch.testing.assert_close(nested.fine_probability[q, j], region_p[q, region] * cell_p[q, best] / mass)
        # joint probabilities over all cells of all regions sum to one
        full = nested_suggestions(region_log_p[q:q + 1], cell_log_p[q:q + 1], parent, k_coarse=5, k_fine=4)
        torch.testing.assert_close(full.fine_probability.sum(), torch.tensor(1.0))


def test_regions_with_fewer_cells_than_asked_are_padded_and_reported_in_json():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=1)
    parent = torch.from_numpy(taxonomy.node_ancestors(np.arange(4), "cell", "region"))
    region_log_p = torch.tensor([[0.75, 0.25]]).log()
    cell_log_p = torch.tensor([[0.1, 0.2, 0.6, 0.1]]).log()   # the best city lies in the weaker region
    nested = nested_suggestions(region_log_p, cell_log_p, parent, k_coarse=2, k_fine=3)
    assert nested.fine[0, 0].tolist() == [1, 0, -1]
    suggestions = suggestions_to_json(taxonomy, "region", "cell", nested)
    assert [s["region"] for s in suggestions] == ["r0", "r1"]
    assert [c["cell"] for c in suggestions[0]["cells"]] == ["r0c1", "r0c0"]
    assert suggestions[0]["probability"] == pytest.approx(0.75)
    assert suggestions[0]["cells"][0]["probability"] == pytest.approx(0.75 * 0.2 / 0.3)
    assert suggestions[1]["cells"][0] == {"cell": "r1c0", "probability": pytest.approx(0.25 * 0.6 / 0.7),
                                          "conditional": pytest.approx(0.6 / 0.7)}
