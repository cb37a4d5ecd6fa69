"""The geo model's post-training stage: region-conditioned cell scores, the blend chosen with them,
saved with the weights (`hmtrec.models.sequence.geo_post`)."""

import numpy as np
import pytest
import torch

from geo_synthetic import geo_taxonomy
from hmtrec.errors import ConfigError
from hmtrec.models.sequence.geo import ActionTransformer, ActionTransformerParams
from hmtrec.models.sequence.geo_post import fit_settings, score_rows

# 2 regions of 2 cells: cells 0, 1 in region 0; cells 2, 3 in region 1
REGION = torch.tensor([[0.55, 0.45]])
CELL = torch.tensor([[0.3, 0.2, 0.1, 0.4]])


def model_with(**params) -> ActionTransformer:
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=1)
    return ActionTransformer(taxonomy, ActionTransformerParams(dim=8, **params), ["event"]).eval()


def test_conditioned_cells_are_the_cell_head_times_the_region_head_to_the_alpha():
    model = model_with(region_conditioning=True)
    served = model.served({"region": REGION, "cell": CELL}, None, None, torch.tensor([1.0]))
    # q(c) ∝ p(c) p(r(c)): 0.3 * 0.55, 0.2 * 0.55, 0.1 * 0.45, 0.4 * 0.45, over their sum 0.5
    torch.testing.assert_close(served["cell"].exp(), torch.tensor([[0.33, 0.22, 0.09, 0.36]]))
    torch.testing.assert_close(served["region"].exp(), REGION)            # the region head, untouched
    alpha_2 = model.served({"region": REGION, "cell": CELL}, None, None, torch.tensor([2.0]))["cell"].exp()
    expected = torch.tensor([0.3 * 0.3025, 0.2 * 0.3025, 0.1 * 0.2025, 0.4 * 0.2025])
    torch.testing.assert_close(alpha_2, (expected / expected.sum())[None])
    assert alpha_2.argmax().item() == 0                                   # now inside the top region
    unconditioned = model.served({"region": REGION, "cell": CELL}, None, None, torch.tensor([0.0]))
    torch.testing.assert_close(unconditioned["cell"].exp(), CELL)


def test_tied_regions_are_the_marginals_of_the_conditioned_cells_and_the_blend_comes_first():
    model = model_with(region_conditioning=True, tied_regions=True, reference_blend=True)
    reference = {"region": torch.tensor([[0.25, 0.75]]), "cell": torch.tensor([[0.1, 0.1, 0.7, 0.1]])}
    weights = torch.tensor([[0.2, 0.5]])                                  # [B, heads]: region 0.2, cell 0.5
    served = model.served({"region": REGION, "cell": CELL}, reference, weights, torch.tensor([1.0]))
    region = 0.8 * REGION + 0.2 * reference["region"]                      # [0.49, 0.51]
    cell = 0.5 * CELL + 0.5 * reference["cell"]                            # [0.2, 0.15, 0.4, 0.25]
    joint = cell * region[:, [0, 0, 1, 1]]
    torch.testing.assert_close(served["cell"].exp(), joint / joint.sum())
    torch.testing.assert_close(served["region"].exp(), torch.stack([joint[:, :2].sum(1), joint[:, 2:].sum(1)], 1)
                               / joint.sum())
    # the served region holds the served top cell
    assert served["cell"].argmax().item() // 2 == served["region"].argmax().item()


def test_a_single_level_model_is_conditioned_on_its_summed_cells():
    model = model_with(levels=["cell"], region_conditioning=True)
    cell = torch.tensor([[0.3, 0.25, 0.05, 0.4]])                          # regions summed: 0.55, 0.45
    served = model.served({"cell": cell}, None, None, torch.tensor([1.0]))
    joint = cell * torch.tensor([[0.55, 0.55, 0.45, 0.45]])
    torch.testing.assert_close(served["cell"].exp(), joint / joint.sum())
    torch.testing.assert_close(served["region"].exp(), torch.tensor([[0.55, 0.45]]))


def test_alpha_and_the_cell_blend_are_chosen_together_per_bucket_on_held_out_rows():
    model = model_with(region_conditioning=True, reference_blend=True)
    # bucket 0: the cell head ranks cell 3 first in region 1, the region head is sure of region 0
    # and the target is cell 0: conditioning fixes it. bucket 1: the cell head is right alone.
    inputs = {"model": {"region": torch.tensor([[0.9, 0.1], [0.5, 0.5]]),
                        "cell": torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.1, 0.6, 0.2, 0.1]])},
              "reference": {"region": torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
                            "cell": torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])},
              "targets": {"region": torch.tensor([0, 0]), "cell": torch.tensor([0, 1])},
              "buckets": torch.tensor([0, 1])}
    weights, alpha = fit_settings(model, inputs, torch.arange(2), blend=True, conditioning=True)
    assert alpha[0] > 0
    assert weights[1, 1] < 0.5              # bucket 1: the reference would pull cell 0 above the target
    scored = score_rows(model, inputs, torch.arange(2), weights, alpha)
    assert scored["cell"][0].tolist() == [1, 1]     # both targets first
    _, alone = fit_settings(model, inputs, torch.arange(2), blend=False, conditioning=False)
    assert alone is None


def test_the_fitted_alpha_is_saved_with_the_weights_and_old_weights_load_without_it():
    torch.manual_seed(0)
    model = model_with(region_conditioning=True, reference_blend=True)
    with torch.no_grad():
        model.conditioning_alpha.copy_(torch.tensor([0.5, 2.0]))
        model.blend_weights.fill_(0.25)
    state = model.state_dict()
    assert state["conditioning_alpha"].tolist() == [0.5, 2.0]
    again = model_with(region_conditioning=True, reference_blend=True)
    again.load_state_dict(state)
    assert again.conditioning_alpha.tolist() == [0.5, 2.0] and bool((again.blend_weights == 0.25).all())
    # weights trained without the switch: the stage is off until fitted; a network weight missing is an error
    plain = {key: value for key, value in state.items() if key not in ("conditioning_alpha", "blend_weights")}
    fresh = model_with(region_conditioning=True, reference_blend=True)
    fresh.load_state_dict(plain)
    assert not fresh.conditioning_alpha.any() and not fresh.blend_weights.any()
    model_with().load_state_dict(state)     # left-over post-training buffers are dropped
    plain.pop("summary")
    with pytest.raises(RuntimeError, match="summary"):
        fresh.load_state_dict(plain)


def test_tied_regions_need_the_conditioning():
    with pytest.raises(ConfigError, match="model.tied_regions"):
        model_with(tied_regions=True)
    with pytest.raises(Exception, match="conditioning_alphas"):
        ActionTransformerParams(conditioning_alphas=[-1.0])
    assert np.isfinite(ActionTransformerParams(conditioning_alphas=[2, 0, 2]).conditioning_alphas).all()


def test_the_last_repeat_splits_every_activity_bucket():
    from hmtrec.data.sequences import PAD

    model = model_with(reference_blend=True, blend_last_repeat=True)        # edges [1]: none / some
    assert model.n_blend_buckets == 4 and model.blend_weights.shape == (2, 4)
    # venue v is cell v here; row 0: the two latest (1 and 2 days) both in cell 0; row 1: cells 1, 2;
    # row 2: one old action
    leaves = torch.tensor([[3, 0, 0], [1, 2, PAD], [2, PAD, PAD]])
    ages = torch.tensor([[10.0, 2.0, 1.0], [1.0, 3.0, 0.0], [20.0, 0.0, 0.0]])
    assert model.recent_activity_buckets(leaves, ages).tolist() == [3, 1, 0]
    # weights fitted with other buckets are refitted, not loaded
    other = model_with(reference_blend=True)
    other.load_state_dict(model.state_dict())
    assert other.blend_weights.shape == (2, 2)
