import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.data.features import FeatureEncoder, FeatureSchema, TaskSpec
from hmtrec.errors import ConfigError
from hmtrec.models.ranking.base import LossSettings
from hmtrec.models.registry import model_names, validate_model_params
from hmtrec.train.losses import UncertaintyWeighting, masked_task_losses

MODELS = ["shared_bottom", "mmoe", "ple", "hinet", "mfh"]
SMALL = {"shared_bottom": {"bottom_hidden": [16, 8]}, "mmoe": {"expert_hidden": [16, 8]},
         "ple": {"expert_hidden": [16, 8]},
         "hinet": {"scenario_expert_hidden": [16, 8], "task_expert_hidden": [8]},
         "mfh": {"level_hidden": [[16, 8], [8]], "facets": ["scenario", "group", "task"]}}


def encoded_rows(n=64, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user": rng.integers(0, 20, n).astype(str), "item": rng.integers(0, 10, n).astype(str),
        "price": rng.normal(size=n), "tags": ["a|b", "c", "b|c|d", ""] * (n // 4),
        "surface": np.array(["home", "search", "feed"])[np.arange(n) % 3],
        "group": np.array(["new", "old"])[(np.arange(n) // 3) % 2],
        "click": rng.integers(0, 2, n), "like": rng.integers(0, 2, n).astype(float),
        "watch": rng.normal(size=n)})
    frame.loc[::5, "like"] = np.nan
    schema = FeatureSchema(categorical=["user", "item"], numeric=["price"], multi_valued=[{"column": "tags"}],
                           scenario="surface", facets=["group"])
    tasks = [TaskSpec(name="click"), TaskSpec(name="like"), TaskSpec(name="watch", type="regression")]
    encoder = FeatureEncoder(schema, tasks).fit(frame)
    return encoder, encoder.transform(frame)


def build(name, weighting="fixed", **extra):
    encoder, rows = encoded_rows()
    entry, params = validate_model_params("ranking", {"name": name, "embedding_init_std": 0.1, **SMALL[name], **extra})
    torch.manual_seed(0)
    return entry.builder(params, layout=encoder.layout(), loss=LossSettings(weighting=weighting)), rows


def test_every_model_is_registered():
    assert set(MODELS) <= set(model_names("ranking"))


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_and_gradient_flow(name):
    model, rows = build(name, weighting="uncertainty")
    batch = rows.batch(slice(0, 48))
    outputs = model(batch)
    assert list(outputs) == ["click", "like", "watch"]
    assert all(value.shape == (48,) for value in outputs.values())
    predictions = model.predict(batch)
    assert ((predictions["click"] > 0) & (predictions["click"] < 1)).all()
    loss, parts = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and set(parts) == {"click", "like", "watch"}
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"


def test_hinet_attention_never_weights_the_own_scenario():
    model, rows = build("hinet")
    scenario = torch.tensor([0, 1, 2, 2, 0])
    weights = model.scenario_attention(scenario)
    assert torch.all(weights[torch.arange(5), scenario] == 0)
    assert torch.allclose(weights.sum(1), torch.ones(5))
    # the "others" mix changes only through other scenarios' experts: zeroing the own scenario's
    # experts must leave the attention output untouched
    x = model.embed(rows.batch(slice(0, 5)))
    with torch.no_grad():
        before = model.scenario_representation(x, scenario)
        n_specific = model.params.n_scenario_specific_experts
        bank = model.scenario_specific.specific
        for tensor in list(bank.weights) + list(bank.biases):
            tensor[0:n_specific] = 0          # scenario 0's experts output 0
        after = model.scenario_representation(x, scenario)
    width = before.shape[1] // 3
    rows_of_scenario_0 = scenario == 0
    assert torch.allclose(before[rows_of_scenario_0, 2 * width:], after[rows_of_scenario_0, 2 * width:])
    assert not torch.allclose(before[~rows_of_scenario_0, 2 * width:], after[~rows_of_scenario_0, 2 * width:])


def test_mfh_loss_ignores_rows_outside_a_leaf_facet():
    model, rows = build("mfh")
    batch = rows.batch(torch.nonzero((rows.scenario == 1) & (rows.facets[:, 0] == 0)).squeeze(1))
    assert len(batch["labels"]) > 3
    model.loss(batch)[0].backward()
    # leaves are laid out [scenario, group, task]; only (scenario 1, group 0, any task) may learn
    grad = model.towers.bank.weights[0].grad.abs().sum(dim=(1, 2)).view(3, 2, 3)
    assert (grad[1, 0] > 0).all()
    grad[1, 0] = 0
    assert (grad == 0).all()
    # and in the scenario-first tree, the level-2 switchers under other scenarios get nothing either
    level_two = model.trees[0].levels[1].layers[0]              # 3 groups (scenarios) x 2 branches (groups)
    for bank in (level_two.specific, level_two.shared):
        per_group = bank.weights[0].grad.abs().sum(dim=(1, 2)).view(3, -1).sum(1)
        assert per_group[1] > 0 and per_group[0] == 0 and per_group[2] == 0


def test_mfh_orders_must_permute_the_facets():
    with pytest.raises(ValueError, match="not a permutation"):
        build("mfh", orders=[["scenario", "task"]])


def test_masked_task_losses_ignore_masked_rows():
    outputs = torch.tensor([[0.3, 1.0], [-1.2, 2.0], [0.5, -1.0]])
    labels = torch.tensor([[1.0, 0.5], [0.0, 9.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    losses, counts = masked_task_losses(outputs, labels, mask, ["binary", "regression"])
    expected_binary = -(np.log(1 / (1 + np.exp(-0.3))) + np.log(1 - 1 / (1 + np.exp(1.2)))) / 2
    assert losses[0].item() == pytest.approx(expected_binary, rel=1e-5)
    assert losses[1].item() == pytest.approx((1.0 - 0.5) ** 2)
    assert counts.tolist() == [2, 1]
    all_masked = masked_task_losses(outputs, labels, torch.zeros_like(mask), ["binary", "regression"])[0]
    assert torch.equal(all_masked, torch.zeros(2))


def test_uncertainty_weighting_matches_kendall_formula():
    weighting = UncertaintyWeighting(["binary", "regression"], [1.0, 2.0])
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([0.7, 3.0])
    total = weighting(losses, torch.ones(2))
    expected = (np.exp(-0.5) * 0.7 + 0.25) + 2.0 * (0.5 * np.exp(1.0) * 3.0 - 0.5)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # a task absent from the batch contributes nothing, not even its regulariser
    assert weighting(losses, torch.tensor([1.0, 0.0])).item() == pytest.approx(np.exp(-0.5) * 0.7 + 0.25, rel=1e-6)


def test_unknown_model_key_is_a_config_error():
    with pytest.raises(ConfigError, match="model.n_expert"):
        validate_model_params("ranking", {"name": "mmoe", "n_expert": 3})


def test_oov_rate_replaces_ids_only_in_training():
    model, rows = build("mmoe", oov_rate={"user": 1.0})
    batch = rows.batch(slice(0, 16))
    unseen = {**batch, "categorical": batch["categorical"].clone()}
    unseen["categorical"][:, 0] = 0
    model.train()
    torch.manual_seed(1)
    trained_view = model.outputs_matrix(batch)
    model.eval()
    assert torch.allclose(trained_view, model.outputs_matrix(unseen), atol=1e-6)   # users dropped to OOV
    assert not torch.allclose(model.outputs_matrix(batch), model.outputs_matrix(unseen))
    with pytest.raises(ValueError, match="not categorical features"):
        build("mmoe", oov_rate={"nope": 0.5})


@pytest.mark.parametrize("name", MODELS)
def test_linear_terms_add_one_scalar_per_id_and_task(name):
    model, rows = build(name, linear=True)
    model.eval()
    batch = rows.batch(slice(0, 16))
    body = model.task_logits(batch)
    assert all(torch.equal(model(batch)[t], body[t]) for t in body)        # the terms start at 0
    with torch.no_grad():
        model.linear.weight.weight.normal_()
    weights = model.linear.weight.weight
    offsets = model.embedding.offsets
    ids = batch["categorical"]
    expected = weights[ids[:, 0] + offsets[0]] + weights[ids[:, 1] + offsets[1]]   # user + item, per task
    outputs = model(batch)
    for i, task in enumerate(model.task_names):
        assert torch.allclose(outputs[task], body[task] + expected[:, i])
    model.train()
    model.loss(batch)[0].backward()
    assert model.linear.weight.weight.grad.abs().sum() > 0


def test_embedding_l2_adds_the_mean_squared_norm_of_the_looked_up_embeddings():
    plain, rows = build("mmoe")
    regularised, _ = build("mmoe", embedding_l2=0.5)
    batch = rows.batch(slice(0, 16))
    norm = regularised.embedding.field_embeddings(batch).pow(2).sum((1, 2)).mean()
    assert regularised.loss(batch)[0].item() == pytest.approx(plain.loss(batch)[0].item() + 0.5 * norm.item(),
                                                              rel=1e-5)


def test_embedding_weight_decay_adds_lambda_times_each_row_to_its_gradient_even_for_rows_not_looked_up():
    plain, rows = build("mmoe", linear=True)
    decayed, _ = build("mmoe", linear=True, embedding_weight_decay=0.1)
    batch = rows.batch(slice(0, 4))
    with torch.no_grad():
        plain.linear.weight.weight.normal_()
    decayed.load_state_dict(plain.state_dict())
    plain.train()
    decayed.train()
    plain.loss(batch)[0].backward()
    decayed.loss(batch)[0].backward()
    for get in (lambda m: m.embedding.table.weight, lambda m: m.linear.weight.weight):
        extra = get(decayed).grad - get(plain).grad
        assert torch.allclose(extra, 0.1 * get(decayed).detach(), atol=1e-6)
    looked_up = (batch["categorical"] + decayed.embedding.offsets[:batch["categorical"].shape[1]]).unique()
    untouched = torch.ones(decayed.embedding.table.num_embeddings, dtype=torch.bool)
    untouched[looked_up] = False
    assert untouched.any() and decayed.embedding.table.weight.grad[untouched].abs().sum() > 0


def rate_prior_rows():
    # movie a: 3 of 4 clicked, movie b: 0 of 2 (prior 3 / 6); women clicked a 2 of 2, men 1 of 2
    frame = pd.DataFrame({"movie_id": ["a", "a", "a", "a", "b", "b"], "user_id": ["u1", "u1", "u2", "u2", "u1", "u2"],
                          "gender": ["F", "F", "M", "M", "F", "M"], "surface": ["home"] * 3 + ["feed"] * 3,
                          "click": [1, 1, 1, 0, 0, 0], "watch": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    schema = FeatureSchema(categorical=["user_id", "movie_id", "gender"], scenario="surface")
    encoder = FeatureEncoder(schema, [TaskSpec(name="click"), TaskSpec(name="watch", type="regression")]).fit(frame)
    return encoder, frame


def prior_model(encoder, **prior):
    entry, params = validate_model_params("ranking", {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4],
                                                      "rate_prior": {"smoothing": 2.0, **prior}})
    return entry.builder(params, layout=encoder.layout())


def test_rate_prior_adds_the_smoothed_training_rate_logit_by_hand():
    encoder, frame = rate_prior_rows()
    model = prior_model(encoder, kind="movie-demographic", demographics=["gender"])
    model.fit_rate_prior(encoder.transform(frame))
    test = pd.DataFrame({"movie_id": ["a", "a", "b", "unseen"], "user_id": ["u1", "new", "u2", "u1"],
                         "gender": ["F", "M", "F", "F"], "surface": ["home"] * 4, "click": [1, 0, 1, 0],
                         "watch": [0.0] * 4})
    batch = encoder.transform(test).batch(slice(None))
    movie_a, movie_b = (3 + 2 * 0.5) / (4 + 2), (0 + 2 * 0.5) / (2 + 2)
    a_female, a_male = (2 + 2 * movie_a) / (2 + 2), (1 + 2 * movie_a) / (2 + 2)
    b_female = (0 + 2 * movie_b) / (1 + 2)          # 0 of 1 women clicked movie b
    expected = np.log(np.array([a_female, a_male, b_female, 0.5]) / (1 - np.array([a_female, a_male, b_female, 0.5])))
    offset = model.rate_prior(batch)
    assert offset[:, 0].numpy() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(offset[:, 1], torch.zeros(4))                     # no offset for the regression task
    model.eval()
    body = model.task_logits(batch)
    assert torch.allclose(model(batch)["click"], body["click"] + offset[:, 0])
    # saved with the weights, never trained
    assert "rate_prior.demographic_0" in model.state_dict()
    assert not any(name.startswith("rate_prior") for name, _ in model.named_parameters())
    reloaded = prior_model(encoder, kind="movie-demographic", demographics=["gender"])
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.rate_prior(batch), offset)


def test_rate_prior_movie_plus_user_and_scenario_columns_match_the_rate_baseline():
    from hmtrec.models.ranking.rates import RateBaseline

    encoder, frame = rate_prior_rows()
    rows = encoder.transform(frame)
    user = prior_model(encoder, kind="movie+user")
    user.fit_rate_prior(rows)
    by_scenario = prior_model(encoder, kind="movie-demographic", demographics=["surface"])
    by_scenario.fit_rate_prior(rows)
    batch = rows.batch(slice(None))
    for model, kind, demographics in ((user, "movie+user", ()), (by_scenario, "movie-demographic", ("surface",))):
        baseline = RateBaseline(kind, smoothing=2.0, demographics=demographics).fit(frame, ["click"])
        assert model.rate_prior(batch)[:, 0].numpy() == pytest.approx(baseline.predict_logits(frame)["click"], rel=1e-5)
    movie_a, user_1 = 4 / 6, (2 + 1) / (3 + 2)
    assert user.rate_prior(batch)[0, 0].item() == pytest.approx(
        np.log(movie_a / (1 - movie_a)) + np.log(user_1 / (1 - user_1)), rel=1e-5)   # logit(prior) = 0


def test_rate_prior_names_unknown_columns():
    encoder, _ = rate_prior_rows()
    with pytest.raises(ValueError, match=r"model.rate_prior names columns .*\['occupation'\]"):
        prior_model(encoder, kind="movie-demographic", demographics=["gender", "occupation"])


def test_rate_blend_mixes_logits_by_the_weights_chosen_on_validation():
    """Untrained network (noise) against an informative rate: the mix is (1 - w) network + w rate
    with w > 0; before fitting the forward pass is the network's alone; saved with the weights."""
    from hmtrec.models.ranking.rate_blend import fit_rate_blend

    rng = np.random.default_rng(0)
    n = 400
    movies = rng.integers(0, 8, n)
    frame = pd.DataFrame({"movie_id": [f"m{m}" for m in movies], "user_id": [f"u{u}" for u in rng.integers(0, 5, n)],
                          "gender": rng.choice(["F", "M"], n), "surface": rng.choice(["home", "feed"], n),
                          "click": (rng.random(n) < np.where(movies < 4, 0.8, 0.2)).astype(int),
                          "watch": rng.normal(size=n)})
    schema = FeatureSchema(categorical=["user_id", "movie_id", "gender"], scenario="surface")
    encoder = FeatureEncoder(schema, [TaskSpec(name="click"), TaskSpec(name="watch", type="regression")]).fit(frame)
    entry, params = validate_model_params("ranking", {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4],
                                                      "embedding_init_std": 0.5,
                                                      "rate_blend": {"demographics": ["gender"], "smoothings": [2.0, 50.0]}})
    model = entry.builder(params, layout=encoder.layout()).eval()
    train, valid = encoder.transform(frame.iloc[:300]), encoder.transform(frame.iloc[300:])
    batch = valid.batch(slice(None))
    network = model(batch)
    assert torch.equal(network["click"], model.task_logits(batch)["click"])     # not fitted: the network alone
    record = fit_rate_blend(model, train, valid, params.rate_blend)
    w = record["weights"]["click"]
    assert 0 < w <= 1 and record["valid"]["blend"] > record["valid"]["network"]
    rate = model.rate_blend.chosen(batch)[:, 0]
    # the chosen rate's tables are those of its smoothing, whichever was tried last
    from hmtrec.models.ranking.blocks import RatePrior

    refitted = RatePrior(encoder.layout(), record["kind"], "movie_id", "user_id", ["gender"], record["smoothing"]).fit(train)
    assert torch.allclose(refitted(batch)[:, 0], rate)
    assert torch.allclose(model(batch)["click"], (1 - w) * network["click"] + w * rate, atol=1e-6)
    assert torch.equal(model(batch)["watch"], network["watch"])                  # regression tasks untouched
    with model.rate_blend.suspended():
        assert torch.equal(model(batch)["click"], network["click"])
    reloaded = entry.builder(params, layout=encoder.layout()).eval()
    reloaded.load_state_dict(model.state_dict())
    assert torch.allclose(reloaded(batch)["click"], model(batch)["click"])


def test_rate_blend_keeps_the_network_alone_when_the_mix_does_not_help():
    """A network that already ranks validation perfectly: no w above 0 scores higher, and ties go
    to the smaller weight, so w = 0."""
    from hmtrec.models.ranking.rate_blend import fit_rate_blend

    encoder, frame = rate_prior_rows()
    entry, params = validate_model_params("ranking", {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4],
                                                      "rate_blend": {"kinds": ["movie"], "smoothings": [2.0]}})
    model = entry.builder(params, layout=encoder.layout()).eval()
    rows = encoder.transform(frame)
    labels = rows.labels[:, 0]
    model.task_logits = lambda batch: {"click": 50 * (batch["labels"][:, 0] - 0.5), "watch": batch["labels"][:, 1]}
    record = fit_rate_blend(model, rows, rows, params.rate_blend)
    assert record["weights"] == {"click": 0.0} and not model.rate_blend.active
    assert labels.sum() > 0


def test_rate_blend_skips_a_run_without_binary_tasks_or_validation_rows():
    from hmtrec.models.ranking.rate_blend import fit_rate_blend

    encoder, frame = rate_prior_rows()
    entry, params = validate_model_params("ranking", {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4],
                                                      "rate_blend": {"kinds": ["movie"]}})
    model = entry.builder(params, layout=encoder.layout())
    rows = encoder.transform(frame)
    assert "no validation rows" in fit_rate_blend(model, rows, encoder.transform(frame.iloc[:0]), params.rate_blend)["skipped"]
    model.rate_blend.binary = []
    assert "no binary task" in fit_rate_blend(model, rows, rows, params.rate_blend)["skipped"]
    assert not model.rate_blend.active
