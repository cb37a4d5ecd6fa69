"""The training loop's switches: learning-rate schedule, wall-clock budget, `precision: auto`,
threads and device checks, and the item losses (label smoothing, sampled softmax with log-Q)."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from hmtrec.models.sequence.losses import ItemLossParams, item_loss, sampled_softmax_cross_entropy, softmax_cross_entropy
from hmtrec.train import trainer as trainer_module
from hmtrec.train.trainer import Trainer, TrainerSettings, check_device, choose_precision, lr_factor

from tests.test_trainer import Regression, batches, reference_and_resumed, validation


# ---- learning-rate schedule ----------------------------------------------------------------------

def test_lr_factor_warms_up_linearly_then_decays_to_the_floor():
    warm = [lr_factor(step, 100, "cosine", 10, 0.1) for step in range(10)]
    assert warm == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert lr_factor(10, 100, "cosine", 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, "cosine", 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)   # half-way: the midpoint
    assert lr_factor(100, 100, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, "linear", 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, "constant", 10, 0.0) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 10, "step", 0, 0.0)


def scheduled(**extra):
    return TrainerSettings(epochs=4, lr=0.05, seed=3, monitor="neg_mse", lr_schedule="cosine",
                           warmup_fraction=0.25, lr_floor=0.1, **extra)


def test_the_schedule_is_applied_per_step_and_recorded_per_epoch(tmp_path):
    torch.manual_seed(0)
    state = Trainer(Regression(), scheduled(), tmp_path, validate=validation).fit(batches, lambda epoch: 5)
    assert state.total_steps == 20
    # the lr of each epoch's last step: 5 warm-up steps, then cosine over the 15 left
    expected = [0.05 * lr_factor(step, 20, "cosine", 5, 0.1) for step in (4, 9, 14, 19)]
    assert [record["lr"] for record in state.history] == pytest.approx(expected)
    assert all(record["valid_seconds"] >= 0 and "valid_neg_mse" in record for record in state.history)


def test_a_scheduled_run_resumes_bit_identically(tmp_path):
    reference, resumed, state = reference_and_resumed(scheduled(), tmp_path, lambda epoch: 5)
    assert state.epoch == 4
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor)


def test_a_schedule_needs_the_epoch_length():
    with pytest.raises(ValueError, match="steps per epoch"):
        Trainer(Regression(), scheduled()).fit(batches)


# ---- wall-clock budget ---------------------------------------------------------------------------

def test_the_budget_stops_after_the_epoch_that_passes_it_and_says_so(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 30))   # every perf_counter call advances 30 s
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    settings = TrainerSettings(epochs=10, lr=0.05, monitor="neg_mse", budget_minutes=2.0)
    state = Trainer(Regression(), settings, tmp_path, validate=validation).fit(batches)
    assert state.stopped_by_budget and not state.stopped_early
    assert 1 <= state.epoch < 10
    assert state.fit_seconds >= 120 and state.fit_seconds - state.history[-1]["epoch_seconds"] < 120 + 60
    # resuming a run that stopped on its budget does not train on, unless the budget grew
    again = Trainer(Regression(), settings, tmp_path, validate=validation).fit(batches)
    assert again.epoch == state.epoch
    settings.budget_minutes = 1000.0
    longer = Trainer(Regression(), settings, tmp_path, validate=validation).fit(batches)
    assert longer.epoch == 10 and not longer.stopped_by_budget


def test_a_cpu_clock_budget_counts_process_time_per_thread(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 30))   # 30 CPU seconds per process_time call; the wall clock barely moves
    monkeypatch.setattr(trainer_module.time, "process_time", lambda: float(next(clock)))
    monkeypatch.setattr(trainer_module.torch, "get_num_threads", lambda: 2)
    settings = TrainerSettings(epochs=10, lr=0.05, budget_minutes=1.0, budget_clock="cpu")
    state = Trainer(Regression(), settings, tmp_path).fit(batches)
    assert state.stopped_by_budget and state.fit_cpu_seconds / 2 >= 60 and state.fit_seconds < 60


# ---- precision -----------------------------------------------------------------------------------

def test_auto_precision_is_fp32_without_native_bf16_and_never_probes():
    def probe(precision):
        raise AssertionError("no probe on a CPU without bf16 units")

    choice, why = choose_precision(torch.device("cpu"), probe, flags={"avx2", "fma"})
    assert choice == "fp32" and "no native bf16" in why


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, "bf16"), (0.95, "fp32")])
def test_auto_precision_probes_when_the_cpu_has_bf16_units(bf16_seconds, expected):
    seconds = {"fp32": 1.0, "bf16": bf16_seconds}
    choice, why = choose_precision(torch.device("cpu"), seconds.__getitem__, flags={"amx_bf16"})
    assert choice == expected and "amx_bf16" in why and "probe" in why


def test_auto_precision_probe_is_cached_per_key():
    calls = []

    def probe(precision):
        calls.append(precision)
        return {"fp32": 1.0, "bf16": 0.4}[precision]

    key = ("test-cache", object())
    first = choose_precision(torch.device("cpu"), probe, flags={"avx512_bf16"}, cache_key=key)
    second = choose_precision(torch.device("cpu"), probe, flags={"avx512_bf16"}, cache_key=key)
    assert first == second and first[0] == "bf16" and calls == ["fp32", "bf16", "fp32", "bf16"]


def test_precision_probe_on_cpu_counts_work_not_time_spent_descheduled(tmp_path):
    """Another process holding the core stretches a step's wall time, not its CPU time; a sleep
    inside the step stands in for being descheduled."""
    class Descheduled(Regression):
        def loss(self, batch):
            time.sleep(0.2)
            return super().loss(batch)

    trainer = Trainer(Descheduled(), TrainerSettings(epochs=1, lr=0.05, precision="auto"), tmp_path)
    assert trainer._time_steps(next(batches(1)), "fp32", repeats=1) < 0.1


def test_auto_precision_is_resolved_once_and_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: {"avx2"})
    settings = TrainerSettings(epochs=2, lr=0.05, precision="auto")
    state = Trainer(Regression(), settings, tmp_path).fit(batches)
    assert state.precision == "fp32" and "no native bf16" in state.precision_reason
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: pytest.fail("a resumed run must not choose again"))
    again = Trainer(Regression(), TrainerSettings(epochs=3, lr=0.05, precision="auto"), tmp_path).fit(batches)
    assert again.epoch == 3 and again.precision == "fp32"


def test_unknown_or_missing_devices_are_named():
    check_device("cpu")
    check_device("auto")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            check_device("cuda:0")


# ---- item losses ---------------------------------------------------------------------------------

def test_label_smoothing_matches_torch():
    torch.manual_seed(0)
    logits = (torch.randn(6, 40) * 3).requires_grad_()
    targets = torch.randint(0, 40, (6,))
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits, targets, label_smoothing=0.2)
    reference.backward()
    loss = softmax_cross_entropy(logits, targets, label_smoothing=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_sampled_softmax_is_a_corrected_softmax_over_the_batch_targets():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(5, 4), torch.randn(9, 4), torch.randn(9)
    targets = torch.tensor([3, 7, 3, 1, 3])
    loss = sampled_softmax_cross_entropy(hidden, weight, bias, targets)
    candidates = torch.tensor([1, 3, 7])
    counts = torch.tensor([1.0, 3.0, 1.0])
    logits = hidden @ weight[candidates].T + bias[candidates] - counts.log()
    column = torch.tensor([1, 2, 1, 0, 1])
    assert loss.item() == pytest.approx(F.cross_entropy(logits, column).item(), rel=1e-5)


def test_sampled_softmax_with_every_item_a_candidate_equals_the_full_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 4), torch.randn(6, 4)
    targets = torch.arange(6)                 # each item once: the same correction for all
    full = F.cross_entropy(hidden @ weight.T, targets)
    assert sampled_softmax_cross_entropy(hidden, weight, None, targets).item() == pytest.approx(full.item(), rel=1e-5)


def test_uniform_negatives_join_the_candidates_and_draw_from_the_seeded_generator():
    hidden, weight = torch.randn(4, 3), torch.randn(50, 3, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(7)
    first = sampled_softmax_cross_entropy(hidden, weight, None, targets, uniform_negatives=20)
    first.backward()
    touched = set(torch.nonzero(weight.grad.abs().sum(1)).flatten().tolist())
    assert {0, 1, 2, 3} < touched and len(touched) > 4     # sampled items got gradient too
    torch.manual_seed(7)
    again = sampled_softmax_cross_entropy(hidden, weight, None, targets, uniform_negatives=20)
    assert again.item() == first.item()


def test_item_loss_switch():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(5, 4), torch.randn(30, 4), torch.randn(30)
    targets = torch.randint(0, 30, (5,))
    full = item_loss(hidden, weight, bias, targets, ItemLossParams())
    assert full.item() == pytest.approx(F.cross_entropy(hidden @ weight.T + bias, targets).item(), rel=1e-5)
    sampled = item_loss(hidden, weight, bias, targets, ItemLossParams(item_loss="sampled"))
    assert math.isfinite(sampled.item()) and sampled.item() < full.item()   # fewer classes to beat


# ---- the sequence train section ----------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_learning_rate_is_refused(value):
    from hmtrec.errors import ConfigError
    from tests.test_pipeline_sequence import small_config

    with pytest.raises(ConfigError, match="train.lr"):
        small_config(train={"lr": value})


def test_an_unknown_device_fails_before_the_run_directory_is_written(tmp_path):
    from hmtrec.errors import ConfigError
    from hmtrec.pipelines import get_pipeline
    from tests.test_pipeline_sequence import small_config

    with pytest.raises(ConfigError, match="train.device.*gpu0"):
        small_config(train={"device": "gpu0"})
    if not torch.cuda.is_available():
        config = small_config(train={"device": "cuda:0"})
        with pytest.raises(ConfigError, match="train.device.*no CUDA"):
            get_pipeline("sequence").train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_the_train_section_defaults_to_auto_precision_and_every_core():
    from hmtrec.pipelines.sequence import TrainSection, set_threads
    from hmtrec.train.trainer import usable_cores

    section = TrainSection()
    assert section.precision == "auto" and section.threads is None
    previous = torch.get_num_threads()
    try:
        assert set_threads(None) == usable_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    settings = TrainSection(lr_schedule="cosine", warmup_fraction=0.1, budget_minutes=5).trainer_settings()
    assert (settings.lr_schedule, settings.warmup_fraction, settings.budget_minutes) == ("cosine", 0.1, 5)


def test_session_parallel_models_get_a_schedule_and_the_sampled_loss(tmp_path):
    """GRU4Rec batches itself: the pipeline takes its step count for the schedule's horizon."""
    import json

    from hmtrec.config import build_config
    from hmtrec.pipelines import get_pipeline
    from tests.test_pipeline_sequence import SMALL

    raw = json.loads(json.dumps(SMALL))
    raw["data"]["synthetic"]["n_sessions"] = 600
    raw["model"] = {"name": "gru4rec", "hidden_size": 16, "item_loss": "sampled", "uniform_negatives": 32}
    raw["train"].update({"epochs": 2, "lr_schedule": "linear", "warmup_fraction": 0.1, "monitor": "MRR@20"})
    raw["baselines"] = []
    raw["eval"] = {"ks": [10, 20]}
    metrics = get_pipeline("sequence").train(build_config(raw), tmp_path / "run")
    training = metrics["models"]["gru4rec"]["training"]
    assert [record["epoch"] for record in training["history"]] == [1, 2]
    assert training["history"][1]["lr"] < training["history"][0]["lr"] <= 0.003
    assert training["precision"] in ("fp32", "bf16") and training["precision_reason"]
