"""The action-token transformer and the history-popularity reference."""

import numpy as np
import pytest
import torch

from geo_synthetic import destination_log, geo_taxonomy, split_by_time
from hmtrec.data.actions import ActionStreams, ExampleSettings, StreamSettings, sample_examples
from hmtrec.data.sequences import PAD
from hmtrec.errors import ConfigError
from hmtrec.evaluate.geo import GeoEvalSettings, evaluate_geo
from hmtrec.models.registry import validate_model_params
from hmtrec.models.sequence.geo import (ActionTransformer, ActionTransformerParams, HistoryPopularity,
                                        HistoryPopularityParams)
from hmtrec.models.sequence.geo_post import fit_post_training
from hmtrec.train.trainer import Trainer, TrainerSettings

SETTINGS = ExampleSettings(streams=[StreamSettings(name="long", min_age_days=3, max_events=16, dormant=True),
                                    StreamSettings(name="short", max_age_days=3, max_events=8)],
                           active_days=2, dormant_days=(10.0, 30.0))

def small_log_batch(n_users: int, max_targets: int, days: int = 30):
    """The default small taxonomy, a destination log of `n_users` over `days`, and one batch of
    at most `max_targets` examples from it."""
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=n_users, days=days)
    examples, _ = sample_examples(log, SETTINGS.model_copy(update={"max_targets": max_targets}))
    return taxonomy, ActionStreams(log, SETTINGS).batch(examples)




def assert_normalised(out: dict, **masses) -> None:
    """Each level's predicted distribution (row 0) is its hand-computed masses, normalised."""
    for level, mass in masses.items():
        mass = torch.as_tensor(mass)
        torch.testing.assert_close(out[level].exp()[0], mass / mass.sum())


def silence_heads(model) -> None:
    """Zero every level head, so that only the other score terms decide."""
    with torch.no_grad():
        for head in model.heads.heads.values():
            head.weight.zero_()
            head.bias.zero_()


def test_token_embedding_is_the_sum_of_level_type_and_age_embeddings():
    torch.manual_seed(0)
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, age_bucket_days=[1, 7, 30]),
                              ["booking", "view", "search"])
    leaves = torch.tensor([[5, 0, 7]])                # venues r1c0v1, r0c0v0, r1c1v1
    types = torch.tensor([[2, 0, 1]])
    ages = torch.tensor([[1.0, 6.5, 400.0]])          # buckets (0,1] -> 0, (1,7] -> 1, > 30 -> 3
    tokens = model.token_embeddings(leaves, types, ages)[0]
    region = model.level_embeddings["region"].weight
    cell = model.level_embeddings["cell"].weight
    venue = model.level_embeddings["venue"].weight
    kind, age = model.type_embedding.weight, model.age_embedding.weight
    expected = torch.stack([
        region[1] + cell[2] + venue[5] + kind[2] + age[0],
        region[0] + cell[0] + venue[0] + kind[0] + age[1],
        region[1] + cell[3] + venue[7] + kind[1] + age[3],
    ])
    torch.testing.assert_close(tokens, expected)
    assert model.age_buckets(torch.tensor([0.5, 1.0, 1.01, 7.0, 29.0, 30.5])).tolist() == [0, 0, 1, 1, 2, 3]


def test_token_levels_choose_which_levels_are_summed():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, token_levels=["cell"]), ["event"])
    assert list(model.level_embeddings) == ["cell"]
    tokens = model.token_embeddings(torch.tensor([[3]]), torch.tensor([[0]]), torch.tensor([[0.5]]))[0, 0]
    expected = model.level_embeddings["cell"].weight[1] + model.type_embedding.weight[0] + model.age_embedding.weight[0]
    torch.testing.assert_close(tokens, expected)


def test_predictions_ignore_padding_and_cover_the_levels():
    torch.manual_seed(0)
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=8, days=40)
    examples, _ = sample_examples(log, SETTINGS.model_copy(update={"max_targets": 10}))
    streams = ActionStreams(log, SETTINGS)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=16, context=["weekday"]), ["event"]).eval()
    batch = streams.batch(examples)
    padded = dict(batch)
    for name in ("long", "short"):                   # three more padding columns per stream
        padded[f"{name}_leaves"] = torch.cat([batch[f"{name}_leaves"], torch.full((len(examples), 3), PAD)], 1)
        padded[f"{name}_types"] = torch.cat([batch[f"{name}_types"], torch.full((len(examples), 3), PAD)], 1)
        padded[f"{name}_age_days"] = torch.cat([batch[f"{name}_age_days"], torch.full((len(examples), 3), 99.0)], 1)
    with torch.no_grad():
        plain, wider = model.predict(batch), model.predict(padded)
    assert list(plain) == ["region", "cell"]
    for level in plain:
        torch.testing.assert_close(plain[level], wider[level])
        torch.testing.assert_close(plain[level].exp().sum(1), torch.ones(len(examples)))


def test_cell_only_model_derives_regions_by_summing_cells():
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=4, days=30)
    examples, _ = sample_examples(log, SETTINGS.model_copy(update={"max_targets": 6}))
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=16, levels=["cell"]), ["event"]).eval()
    assert list(model.heads.levels) == ["cell"] and model.levels == ["region", "cell"]
    with torch.no_grad():
        out = model.predict(ActionStreams(log, SETTINGS).batch(examples))
    cell_probability = out["cell"].exp()
    by_hand = torch.zeros(len(examples), 4)
    for cell in range(20):
        by_hand[:, cell // 5] += cell_probability[:, cell]
    torch.testing.assert_close(out["region"].exp(), by_hand)


def test_window_batches_and_bad_levels_are_refused():
    taxonomy = geo_taxonomy()
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8), ["event"])
    with pytest.raises(ConfigError, match="kind 'geo'"):
        model.predict({"inputs": torch.zeros(2, 3, dtype=torch.long), "targets": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match="model.levels.*'city'"):
        ActionTransformer(taxonomy, ActionTransformerParams(levels=["city"]), ["event"])
    with pytest.raises(ConfigError, match="model.age_bucket_days"):
        validate_model_params("sequence", {"name": "action-transformer", "age_bucket_days": [5, 2]})


def test_training_learns_destinations_beyond_popularity():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=40, days=90, seed=1)
    train, test = split_by_time(log, 70)
    train_settings = SETTINGS.model_copy(update={"max_targets": 600})
    train_streams, test_streams = ActionStreams(train, train_settings), ActionStreams(test, SETTINGS)
    test_examples, _ = sample_examples(test, SETTINGS.model_copy(update={"max_targets": 300}), seed=0)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=32, n_layers=1, dropout=0.0), ["event"])

    def batches(epoch):
        examples, _ = sample_examples(train, train_settings, seed=epoch, streams=train_streams)
        order = np.random.default_rng(epoch).permutation(len(examples))
        for start in range(0, len(order), 128):
            yield train_streams.batch(examples, order[start:start + 128])

    Trainer(model, TrainerSettings(epochs=3, lr=3e-3)).fit(batches)
    settings = GeoEvalSettings(frequency_edges=[100])
    trained = evaluate_geo(model, test_streams, test_examples, settings, train_leaves=train.leaves)
    global_only = HistoryPopularity(taxonomy, HistoryPopularityParams(prior_weight=1e6, half_life_days=None))
    global_only.fit(train)
    popular = evaluate_geo(global_only, test_streams, test_examples, settings, train_leaves=train.leaves)
    # users keep to their favourite cells (85% of actions): the model must find them, popularity cannot
    assert trained["overall"]["cell"]["Acc@1"] > popular["overall"]["cell"]["Acc@1"] + 0.25
    assert trained["overall"]["region"]["Acc@1"] > 0.8
    assert trained["by_kind"]["dormant"]["cell"]["MRR"] > popular["by_kind"]["dormant"]["cell"]["MRR"] + 0.2


def test_history_popularity_counts_the_users_actions():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = HistoryPopularity(taxonomy, HistoryPopularityParams(prior_weight=0.0, half_life_days=None))
    batch = {"a_leaves": torch.tensor([[0, 1, 6, PAD]]), "a_age_days": torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
             "targets": torch.tensor([0])}
    out = model.predict(batch)
    torch.testing.assert_close(out["region"].exp(), torch.tensor([[2 / 3, 1 / 3]]))
    torch.testing.assert_close(out["cell"].exp(), torch.tensor([[2 / 3, 0.0, 0.0, 1 / 3]]))


def test_copy_pointer_puts_mass_on_the_history_only():
    torch.manual_seed(0)
    taxonomy, batch = small_log_batch(n_users=6, max_targets=8)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=16), ["event"]).eval()
    with torch.no_grad():
        model.copy_gate.bias.fill_(-60.0)            # gate ~ 0: the copy distribution alone
        model.copy_gate.weight.zero_()
        out = model.predict(batch)
    history = torch.cat([batch["long_leaves"], batch["short_leaves"]], 1)
    for row in range(len(history)):
        visited = {int(c) for c in taxonomy.ancestors(history[row][history[row] != PAD].numpy(), "cell")}
        probability = out["cell"][row].exp()
        assert set(torch.nonzero(probability > 1e-6).flatten().tolist()) <= visited
        torch.testing.assert_close(probability.sum(), torch.tensor(1.0))
    plain = ActionTransformer(taxonomy, ActionTransformerParams(dim=16, copy_history=False), ["event"])
    assert not hasattr(plain, "copy_gate")


def test_summary_row_is_the_first_row_of_the_full_block():
    from hmtrec.models.sequence.encoder import Block
    from hmtrec.models.sequence.geo import summary_row

    torch.manual_seed(0)
    block = Block(16, 2, 0.0).eval()
    h = torch.randn(3, 7, 16)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = valid[:, None, None, :] | torch.eye(7, dtype=torch.bool)[None, None]
    row, keys = summary_row(block, h, valid)
    torch.testing.assert_close(row, block(h, allowed)[:, 0])
    torch.testing.assert_close(keys, block.attention.qkv(block.norm_attention(h))[..., 16:32])


def test_token_time_adds_the_hour_and_weekday_embeddings():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, token_levels=["cell"], token_time=True),
                              ["event"])
    leaves, types, ages = torch.tensor([[3]]), torch.tensor([[0]]), torch.tensor([[0.5]])
    tokens = model.token_embeddings(leaves, types, ages, torch.tensor([[17]]), torch.tensor([[4]]))[0, 0]
    expected = (model.level_embeddings["cell"].weight[1] + model.type_embedding.weight[0]
                + model.age_embedding.weight[0] + model.hour_embedding.weight[17] + model.weekday_embedding.weight[4])
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(ConfigError, match="token_time"):
        model.token_embeddings(leaves, types, ages)


def test_recency_bias_alone_makes_the_pointer_a_recency_weighted_visit_count():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, age_bucket_days=[1, 7, 30], copy_recency=True),
                              ["event"]).eval()
    with torch.no_grad():
        model.copy_query.weight.zero_()
        model.copy_query.bias.zero_()                 # no content term: attention = softmax(age bias)
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-60.0)             # the copy distribution alone
        model.copy_age_bias.copy_(torch.tensor([0.0, -1.0, -2.0, -3.0]))
        batch = {"a_leaves": torch.tensor([[0, 2, 7]]), "a_types": torch.tensor([[0, 0, 0]]),
                 "a_age_days": torch.tensor([[0.5, 3.0, 40.0]]), "targets": torch.tensor([0])}
        out = model.predict(batch)
    weights = torch.tensor([1.0, float(np.exp(-1.0)), float(np.exp(-3.0))])
    weights = weights / weights.sum()                 # venues 0, 2 lie in cell 0 and 1; venue 7 in cell 3
    expected = torch.stack([weights[0], weights[1], torch.tensor(0.0), weights[2]])
    torch.testing.assert_close(out["cell"].exp()[0], expected, atol=1e-6, rtol=1e-5)


def test_distance_bias_uses_the_last_action_and_each_nodes_centre():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    params = ActionTransformerParams(dim=8, copy_history=False, distance_bias=True, distance_km_edges=[1.0, 5.0],
                                     age_bucket_days=[1, 7], levels=["cell"])
    model = ActionTransformer(taxonomy, params, ["event"]).eval()
    # venues of cell c at latitude c / 100 (about 1.1 km apart), all on one meridian
    model.set_leaf_coordinates(np.column_stack([np.repeat(np.arange(4) / 100, 2), np.zeros(8)]))
    torch.testing.assert_close(model.node_centres("cell")[:, 0], torch.arange(4) / 100)
    batch = {"a_leaves": torch.tensor([[6, 0]]), "a_types": torch.tensor([[0, 0]]),
             "a_age_days": torch.tensor([[9.0, 0.5]]), "targets": torch.tensor([0])}
    plain = model.logits(batch)["cell"]
    with torch.no_grad():
        model.distance_table[0, 0] = torch.tensor([3.0, 2.0, 1.0])   # last action 0.5 days old: age bucket 0
        model.distance_table[0, 1:] = 10.0                            # other age buckets: unused here
    biased = model.logits(batch)["cell"]
    # the last action is venue 0 (cell 0): cell 0 is 0 km away, cell 1 1.1 km, cells 2-3 2.2 and 3.3 km
    torch.testing.assert_close(biased - plain, torch.tensor([[3.0, 2.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="leaf coordinates"):
        model.set_leaf_coordinates(np.zeros((3, 2)))


def test_user_embedding_separates_users_by_their_hash():
    torch.manual_seed(0)
    taxonomy, batch = small_log_batch(n_users=4, max_targets=4)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=16, user_buckets=64), ["event"]).eval()
    other = dict(batch, user_hash=batch["user_hash"] + 1)
    same = dict(batch, user_hash=batch["user_hash"] + 64)      # the same bucket
    with torch.no_grad():
        base = model.predict(batch)["cell"]
        assert not torch.allclose(base, model.predict(other)["cell"])
        torch.testing.assert_close(base, model.predict(same)["cell"])


def test_history_counts_start_as_the_recency_weighted_visit_count():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    params = ActionTransformerParams(dim=8, age_bucket_days=[1, 7, 30], copy_history=False, history_counts=True,
                                     consistency_weight=0.0)
    model = ActionTransformer(taxonomy, params, ["event"]).eval()
    silence_heads(model)                              # the count term alone decides
    with torch.no_grad():
        model.count_age_weight.copy_(torch.log(torch.tensor([1.0, 0.5, 0.25, 0.125])))
        model.count_log_prior.fill_(float(np.log(0.1)))
    batch = {"a_leaves": torch.tensor([[0, 1, 2, 7]]), "a_types": torch.zeros(1, 4, dtype=torch.long),
             "a_age_days": torch.tensor([[0.5, 3.0, 10.0, 40.0]]), "targets": torch.tensor([0])}
    with torch.no_grad():
        out = model.predict(batch)
    # cell 0: venues 0 (w 1) and 1 (w 0.5); cell 1: venue 2 (w 0.25); cell 3: venue 7 (w 0.125); + 0.1 each
    assert_normalised(out, cell=[1.6, 0.35, 0.1, 0.225], region=[1.85, 0.225])


def test_a_query_batch_scores_after_the_history_without_a_target():
    """Inference (`ActionStreams.query`) asks for the destination after each user's actions before t;
    it carries no target, and the models score it as the active example of the same user and time."""
    from hmtrec.data.actions import ACTIVE

    torch.manual_seed(0)
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=8, days=40)
    examples, _ = sample_examples(log, SETTINGS.model_copy(update={"max_targets": 20}))
    active = examples.subset(np.flatnonzero(examples.kind == ACTIVE))
    streams = ActionStreams(log, SETTINGS)
    query = streams.query(active.user, active.time)
    assert not {"targets", "kind", "lead_days"} & set(query)
    models = [ActionTransformer(taxonomy, ActionTransformerParams(dim=16, context=["weekday"], user_buckets=8),
                                ["event"]).eval(),
              HistoryPopularity(taxonomy, HistoryPopularityParams())]
    for model in models:
        with torch.no_grad():
            scored, asked = model.predict(streams.batch(active)), model.predict(query)
        for level in scored:
            torch.testing.assert_close(asked[level], scored[level])


def test_baseline_prior_starts_as_the_reference_and_its_scale_sharpens_it():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    params = ActionTransformerParams(dim=8, copy_history=False, baseline_prior=True)
    model = ActionTransformer(taxonomy, params, ["event"]).eval()
    silence_heads(model)                              # the prior alone decides
    with torch.no_grad():
        model.prior_share_region.copy_(torch.tensor([0.5, 0.5]))
        model.prior_share_cell.copy_(torch.tensor([0.4, 0.1, 0.1, 0.4]))
    batch = {"a_leaves": torch.tensor([[0, 1, 6]]), "a_types": torch.zeros(1, 3, dtype=torch.long),
             "a_age_days": torch.tensor([[0.0, 30.0, 60.0]]), "targets": torch.tensor([0])}
    with torch.no_grad():
        out = model.predict(batch)
    # half-life 30 days: weights 1, 0.5, 0.25; venues 0 and 1 lie in cell 0, venue 6 in cell 3; + 1 x share
    cells = torch.tensor([1.9, 0.1, 0.1, 0.65])
    assert_normalised(out, cell=cells, region=[2.0, 0.75])
    reference = HistoryPopularity(taxonomy, HistoryPopularityParams())
    reference.shares = {"region": model.prior_share_region, "cell": model.prior_share_cell}
    torch.testing.assert_close(out["cell"], reference.predict(batch)["cell"])
    with torch.no_grad():
        model.prior_scale.fill_(2.0)                  # the scale is an exponent on the reference's scores
        sharper = model.predict(batch)["cell"].exp()[0]
    torch.testing.assert_close(sharper, cells ** 2 / (cells ** 2).sum())


def test_baseline_prior_shares_are_the_references_and_saved_with_the_weights():
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=6, days=20)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, baseline_prior=True), ["event"])
    model.fit_prior(log)
    reference = HistoryPopularity(taxonomy, HistoryPopularityParams())
    reference.fit(log)
    for level in ("region", "cell"):
        torch.testing.assert_close(getattr(model, f"prior_share_{level}"), reference.shares[level])
        assert f"prior_share_{level}" in model.state_dict()
    assert not hasattr(ActionTransformer(taxonomy, ActionTransformerParams(dim=8), ["event"]), "prior_scale")


def test_factorized_cells_are_the_region_times_the_cell_within_its_region():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, factorized_weight=1.0), ["event"])
    logits = {"region": torch.log(torch.tensor([[0.75, 0.25]])),
              "cell": torch.tensor([[0.0, float(np.log(3.0)), 1.0, 1.0]])}   # cells 0-1 in region 0, 2-3 in 1
    out = model.factorize(logits)
    # p(cell | region 0) = 1/4, 3/4; p(cell | region 1) = 1/2, 1/2
    factorised = torch.tensor([[0.75 / 4, 0.75 * 3 / 4, 0.25 / 2, 0.25 / 2]])
    torch.testing.assert_close(out["cell"].exp(), factorised)
    torch.testing.assert_close(out["region"], logits["region"])
    model.params.factorized_weight = 0.5             # blended with the flat cell scores, in log space
    flat = torch.log_softmax(logits["cell"], dim=-1)
    torch.testing.assert_close(model.factorize(logits)["cell"], 0.5 * flat + 0.5 * factorised.log())
    # λ = 1: the cells' mass in each region is the region head's, so the consistency term vanishes
    torch.manual_seed(0)
    log_taxonomy, batch = small_log_batch(n_users=4, max_targets=4)
    full = ActionTransformer(log_taxonomy, ActionTransformerParams(dim=8, factorized_weight=1.0), ["event"])
    with torch.no_grad():
        _, parts = full.loss(batch)
    assert parts["consistency"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ConfigError, match="model.factorized_weight"):
        ActionTransformer(taxonomy, ActionTransformerParams(dim=8, levels=["cell"], factorized_weight=1.0), ["event"])


def test_baseline_mix_is_a_third_component_beside_the_head_and_the_pointer():
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=8, baseline_mix=True), ["event"]).eval()
    assert not hasattr(model, "copy_gate")
    with torch.no_grad():
        model.prior_share_region.copy_(torch.tensor([0.5, 0.5]))
        model.prior_share_cell.copy_(torch.tensor([0.4, 0.1, 0.1, 0.4]))
        model.copy_query.weight.zero_()
        model.copy_query.bias.zero_()                 # uniform attention: the copy is the plain visit share
        model.mix_gate.weight.zero_()
        # per level (region, cell) the gate logits of (head, copy, reference): weights 0, 1/4, 3/4
        model.mix_gate.bias.copy_(torch.tensor([-60.0, 0.0, float(np.log(3.0))] * 2))
    batch = {"a_leaves": torch.tensor([[0, 1, 6]]), "a_types": torch.zeros(1, 3, dtype=torch.long),
             "a_age_days": torch.tensor([[0.0, 30.0, 60.0]]), "targets": torch.tensor([0])}
    with torch.no_grad():
        out = model.predict(batch)["cell"].exp()[0]
    reference = torch.tensor([1.9, 0.1, 0.1, 0.65]) / 2.75   # as in the baseline-prior test
    copy = torch.tensor([2 / 3, 0.0, 0.0, 1 / 3])
    torch.testing.assert_close(out, 0.25 * copy + 0.75 * reference)
    with pytest.raises(ConfigError, match="model.baseline_mix"):
        ActionTransformer(taxonomy, ActionTransformerParams(dim=8, baseline_mix=True, copy_history=False), ["event"])


def test_reference_blend_follows_recent_activity_and_its_weights_are_chosen_on_held_out_examples():
    torch.manual_seed(0)
    taxonomy = geo_taxonomy(n_regions=2, cells_per_region=2, venues_per_cell=2)    # cell = venue // 2
    params = ActionTransformerParams(dim=8, reference_blend=True, blend_recent_days=3.0)   # edges [1]
    model = ActionTransformer(taxonomy, params, ["event"]).eval()
    assert model.uses_reference and model.blend_weights.shape == (2, 2)
    # row 0: old actions only (bucket 0); row 1: one action 1 day old (bucket 1)
    batch = {"long_leaves": torch.tensor([[0, 2], [4, PAD]]), "long_types": torch.zeros(2, 2, dtype=torch.long),
             "long_age_days": torch.tensor([[10.0, 20.0], [12.0, 0.0]]),
             "short_leaves": torch.tensor([[PAD], [0]]), "short_types": torch.zeros(2, 1, dtype=torch.long),
             "short_age_days": torch.tensor([[0.0], [1.0]])}
    assert model.recent_activity_buckets(model.action_leaves(batch), model.action_ages(batch)).tolist() == [0, 1]
    with torch.no_grad():   # the heads alone (gate ~ 1), certain of cell 3, a cell nobody visited
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(60.0)
        silence_heads(model)
        model.heads.heads["cell"].bias[3] = 20.0
        model.heads.heads["region"].bias[1] = 20.0
        alone = model.predict(batch)                                  # weights 0: the model alone
        model.blend_weights.copy_(torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
        half = model.predict(batch)
    leaves = torch.cat([batch["long_leaves"], batch["short_leaves"]], 1)
    ages = torch.cat([batch["long_age_days"], batch["short_age_days"]], 1)
    reference = model.reference_log_scores(leaves, ages)
    for level in ("region", "cell"):
        torch.testing.assert_close(half[level][0], alone[level][0])
        torch.testing.assert_close(half[level][1].exp(), 0.5 * alone[level][1].exp() + 0.5 * reference[level][1].exp())
    # held-out targets: row 0 goes to cell 3 (the model is right), row 1 back to its recent cell 0
    # (only the reference knows): bucket 0 keeps the model alone, bucket 1 leans on the reference
    fitted = fit_post_training(model, [(batch, torch.tensor([6, 1]))], np.array([0, 1]), np.array([1, 0]), [1])
    assert fitted["examples"] == [1, 1] and fitted["served"] == "blend"
    for head, level in enumerate(("region", "cell")):
        assert model.blend_weights[head, 0] == 0 and model.blend_weights[head, 1] > 0.5
        assert fitted["weights"][level] == [round(w, 4) for w in model.blend_weights[head].tolist()]
    with torch.no_grad():
        out = model.predict(batch)
    assert out["cell"].argmax(1).tolist() == [3, 0] and out["region"].argmax(1).tolist() == [1, 0]
