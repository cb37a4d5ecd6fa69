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
from hmtrec.train.trainer import Trainer, TrainerSettings

SETTINGS = ExampleSettings(streams=[StreamSettings(name="long", min_age_days=3, max_events=16, dormant=True),
                                    StreamSettings(name="short", max_age_days=3, max_events=8)],
                           active_days=2, dormant_days=(10.0, 30.0))


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
    taxonomy = geo_taxonomy()
    log = destination_log(taxonomy, n_users=6, days=30)
    examples, _ = sample_examples(log, SETTINGS.model_copy(update={"max_targets": 8}))
    batch = ActionStreams(log, SETTINGS).batch(examples)
    model = ActionTransformer(taxonomy, ActionTransformerParams(dim=16), ["event"]).eval()
    with torch.no_grad():
        model.copy_gate.bias.fill_(-60.0)            # gate ~ 0: the copy distribution alone
        model.copy_gate.weight.zero_()
        out = model.predict(batch)
    history = torch.cat([batch["long_leaves"], batch["short_leaves"]], 1)
    for row in range(len(examples)):
        visited = {int(c) for c in taxonomy.ancestors(history[row][history[row] != PAD].numpy(), "cell")}
        probability = out["cell"][row].exp()
        assert set(torch.nonzero(probability > 1e-6).flatten().tolist()) <= visited
        torch.testing.assert_close(probability.sum(), torch.tensor(1.0))
    plain = ActionTransformer(taxonomy, ActionTransformerParams(dim=16, copy_history=False), ["event"])
    assert not hasattr(plain, "copy_gate")
