"""The geo kind (config kind "geo"): next-destination prediction from user-action streams. The run
lifecycle around it (run directory, same-run check, status, `hmtrec evaluate`) is `hmtrec.lifecycle`.

train: load the action log and its geographic taxonomy (`hmtrec.data.loading`) -> cut active and
dormant examples from the train / valid / test splits (`hmtrec.data.actions`) -> train the model
(e.g. the action-token transformer) with the shared Trainer, selecting the best epoch on
validation MRR -> evaluate on test: Acc@K and MRR per level, active vs dormant, by the target's
training frequency, hierarchy-violation rate (`hmtrec.evaluate.geo`). Baselines named in
`baselines:` are fitted and evaluated beside the model on the same examples.

The examples of a split are those of its target events (the split's target mask); their history
is everything in the split's sequences strictly before the prediction time.

Run directory:
  config.yaml   resolved config            run.json        {"kind": "geo", "model", "event_types", ...}
  taxonomy.json the geographic taxonomy    model.safetensors  final (best-epoch) weights
  checkpoint.pt resumable training state   metrics.json    {"test": {model: results}, "history": [...]}
  best.safetensors best epoch's weights     evaluation.json the latest `hmtrec evaluate` (with its overrides)
  log.txt
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from hmtrec.config import StrictModel, register_config
from hmtrec.data.actions import ActionStreams, Examples, ExampleSettings, log_event_types, sample_examples
from hmtrec.data.loading import DataConfig, PreparedData, load_data
from hmtrec.data.sequences import SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.evaluate.geo import GeoEvalSettings, evaluate_geo, print_geo_results
from hmtrec.models.families import GEO_ACTIONS
from hmtrec.models.registry import get_model, post_training_keys, validate_model_params
from hmtrec.lifecycle import LrScheduleSettings, RunKind, TrainSettings, check_final_fit, fit_trainable, register_kind
from hmtrec.rundir import SELECTION_DIR, RunDir, get_logger, save_weights
from hmtrec.serve.artefact import build_geo_model as build_model, load_geo_run  # noqa: F401 (re-exported)

WEIGHTS_FILE = "model.safetensors"
TAXONOMY_FILE = "taxonomy.json"


class GeoTrain(TrainSettings, LrScheduleSettings):
    """The shared train keys (`hmtrec.lifecycle.TrainSettings`) with the geo defaults, the
    learning-rate schedule (`LrScheduleSettings`, as in the sequence kind), plus the monitor,
    resampling and validation sample."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(256, ge=1)
    monitor: str | None = None       # validation key, e.g. "cell_MRR"; default: MRR of the finest level
    patience: int | None = Field(2, ge=0)
    resample_each_epoch: bool = True  # fresh dormant offsets (and target sub-sample) every epoch
    valid_max_targets: int | None = Field(2000, ge=1)  # validation target events (fixed sample) per epoch
    threads: int | None = Field(2, ge=1)  # torch intra-op threads (None: every usable core)
    # active examples per training target and epoch, drawn from T-1 .. T-active_days (None: all of
    # them); the days of one target share most of their history, so fewer cost little signal
    active_per_target: int | None = Field(None, ge=1)
    final_fit: bool = Field(
        False, description="after the epoch and the post-training stage are chosen on valid, train the model "
                           "afresh on train + valid for that many epochs along the same lr curve, with the "
                           "selection's post-training settings, and keep it; the selection model's test figures "
                           "are recorded beside it (training.selection); baselines are fitted on train + valid")


class GeoEval(GeoEvalSettings):
    max_targets: int | None = Field(None, ge=1)  # sub-sample test target events (fixed seed); None: all
    seed: int = 0


@register_config("geo")
class GeoRunConfig(StrictModel):
    # besides hmtrec.rundir.RESUMABLE_CHANGES, a resumed run may be extended by more epochs and
    # validate on another sample (an lr schedule keeps the first run's horizon, in the checkpoint:
    # the added epochs train at lr * lr_floor)
    resumable_changes: ClassVar[tuple[str, ...]] = ("train.epochs", "train.valid_max_targets")

    kind: Literal["geo"] = "geo"
    name: str | None = None
    data: DataConfig
    examples: ExampleSettings = ExampleSettings()
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "action-transformer"})
    baselines: list[str] = Field(default_factory=list)
    train: GeoTrain = GeoTrain()
    eval: GeoEval = GeoEval()

    @field_validator("model")
    @classmethod
    def _known_model(cls, value):
        validate_model_params("sequence", value)     # raises ConfigError naming model.<key>
        return value

    @model_validator(mode="after")
    def _final_fit_needs_valid(self) -> "GeoRunConfig":
        check_final_fit(self.train.final_fit, self.data)
        return self

    def refit_keys(self) -> tuple[str, ...]:
        """The model keys fitted after training (`hmtrec refit` changes them on the trained weights)."""
        return post_training_keys("sequence", self.model)

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, value):
        for name in value:
            get_model("sequence", name)
        return value


# ---- building blocks -------------------------------------------------------------------------
def set_coordinates(model, data: DataConfig, taxonomy: Taxonomy) -> None:
    """Give a model with `distance_bias` its leaves' coordinates (read from the source's venue file)."""
    if not getattr(getattr(model, "params", None), "distance_bias", False):
        return
    if data.source != "foursquare-nyc":
        raise ConfigError(f"key 'model.distance_bias': needs venue coordinates, which source {data.source!r} "
                          "does not give (foursquare-nyc does)")
    from hmtrec.data.geo import leaf_coordinates
    from hmtrec.data.readers import source_folder
    from hmtrec.data.readers.foursquare import read_venues

    venues, file = read_venues(source_folder(data, "foursquare-nyc"))
    model.set_leaf_coordinates(leaf_coordinates(taxonomy, venues["poi"].astype(str).str.strip(), venues["lat"],
                                                venues["lon"], file=file))


def split_examples(log: SequenceData, settings: ExampleSettings, *, max_targets: int | None, seed: int
                   ) -> tuple[ActionStreams, Examples]:
    settings = settings.model_copy(update={"max_targets": max_targets})
    streams = ActionStreams(log, settings)
    examples, _ = sample_examples(log, settings, seed=seed, streams=streams)
    return streams, examples


def training_batches(streams: ActionStreams, examples: Examples, batch_size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield streams.batch(examples, order[start:start + batch_size])


def fit_post_training(model, streams: ActionStreams, examples: Examples, batch_size: int, ks: list[int]
                      ) -> dict | None:
    """With `model.reference_blend` and/or `model.region_conditioning`: fit the trained
    (best-epoch) model's post-training stage on the validation examples (`hmtrec.models.sequence.
    geo_post`); its record (the model alone, each step, fitted and cross-fitted), None for a model
    without either switch."""
    params = getattr(model, "params", None)
    if not (getattr(params, "reference_blend", False) or getattr(params, "region_conditioning", False)):
        return None
    from hmtrec.models.sequence.geo_post import fit_post_training as fit

    order = np.arange(len(examples))
    batches = ((streams.batch(examples, rows), torch.from_numpy(examples.target[rows]))
               for rows in np.array_split(order, max(1, -(-len(examples) // batch_size))))
    record = fit(model, batches, examples.user, examples.kind, ks)
    finest = model.output_levels[-1]
    get_logger().info("post-training stage fitted on validation (%s): weights %s, alpha %s, examples per bucket %s; "
                      "%s MRR cross-fitted: %s", record["served"], record.get("weights"), record.get("alpha"),
                      record["examples"], finest,
                      {name: round(v["cross_fitted"]["overall"][finest]["MRR"], 4)
                       for name, v in record["variants"].items()})
    return record


fit_blend = fit_post_training  # the older name


def flat_validation(results: dict) -> dict[str, float]:
    return {f"{level}_{metric}": value for level, metrics in results["overall"].items()
            for metric, value in metrics.items()}


# ---- the kind ---------------------------------------------------------------------------------
@dataclass
class GeoData:
    """The loaded log, its action types, and the test examples (drawn once, shared by every model)."""

    prepared: PreparedData
    event_types: list[str]
    test: tuple[ActionStreams, Examples] | None = None
    valid: tuple[ActionStreams, Examples] | None = None
    final_fit: bool = False

    @property
    def fitting_log(self) -> SequenceData:
        """What the kept model and the baselines learn from: train, or train + valid (final fit)."""
        return self.prepared.fitting_split(self.final_fit)

    @property
    def train_leaves(self) -> np.ndarray:
        """The target leaves of what the kept model learns from (its frequency buckets)."""
        return target_leaves(self.fitting_log)


def target_leaves(log: SequenceData) -> np.ndarray:
    return log.leaves[log.targets()]


@register_kind
class GeoKind(RunKind):
    """Geo action streams: the model trained on active and dormant examples cut from the action
    log, the baselines fitted; all evaluated on the same test examples."""

    name = "geo"
    config_class = GeoRunConfig
    batch_contract = GEO_ACTIONS
    evaluation_overrides = ("eval", "examples", "baselines", "train.device", "train.threads")

    def model_labels(self, config: GeoRunConfig) -> list[str]:
        return [config.model["name"], *config.baselines]

    def run_info(self, config: GeoRunConfig, data: GeoData) -> dict:
        return {"model": config.model["name"], "event_types": data.event_types}

    def prepare(self, config: GeoRunConfig, *, for_evaluation: bool = False) -> GeoData:
        prepared = load_data(config.data, with_train_all=config.train.final_fit)
        for split in ("train", "valid", "test"):
            if getattr(prepared, split).timestamps is None:
                raise ConfigError(f"key 'data.source': {config.data.source!r} gives no timestamps; "
                                  "geo examples need event times")
        return GeoData(prepared, log_event_types(prepared.train), final_fit=config.train.final_fit)

    def save_data(self, run: RunDir, config: GeoRunConfig, data: GeoData) -> None:
        data.prepared.dataset.taxonomy.save(run.path / TAXONOMY_FILE)

    def build(self, label: str, run: RunDir, config: GeoRunConfig, data: GeoData):
        taxonomy = data.prepared.dataset.taxonomy
        if label != config.model["name"]:
            return build_model(config, taxonomy, data.event_types, {"name": label})
        model = build_model(config, taxonomy, data.event_types)
        set_coordinates(model, config.data, taxonomy)
        if getattr(model, "uses_reference", False):
            model.fit_prior(data.fitting_log)          # the reference's popularity, from what the model learns from
        return model

    def fit(self, label: str, model, run: RunDir, config: GeoRunConfig, data: GeoData, on_epoch_end) -> dict:
        prepared = data.prepared
        if label != config.model["name"]:                # a baseline: fitted, not trained
            model.fit(data.fitting_log)
            return {}
        if not config.train.final_fit:
            return self._train_and_fit_post(model, prepared.train, run.path, config, data, on_epoch_end)
        # train.final_fit: the selection run (epoch and post-training stage chosen on valid) from the
        # same initial weights, then `model` on train + valid for its best number of epochs
        selection = copy.deepcopy(model)
        if getattr(selection, "uses_reference", False):
            selection.fit_prior(prepared.train)
        selection_dir = run.path / SELECTION_DIR
        selection_dir.mkdir(parents=True, exist_ok=True)
        chosen = self._train_and_fit_post(selection, prepared.train, selection_dir, config, data, on_epoch_end)
        test_streams, test_examples = self.test_examples(config, data)
        chosen["test"] = evaluate_geo(selection, test_streams, test_examples, config.eval,
                                      train_leaves=target_leaves(prepared.train))
        get_logger().info("final fit: the selection model (best epoch %d of %d) test: %s", chosen["best_epoch"],
                          len(chosen["history"]), chosen["test"]["overall"])
        final = self._train_and_fit_post(model, prepared.train_all, run.path, config, data, on_epoch_end,
                                         epochs=chosen["best_epoch"], precision=chosen.get("precision"))
        from hmtrec.models.sequence.geo_post import adopt_post_training

        adopt_post_training(model, selection)
        save_weights(run.path / WEIGHTS_FILE, model.state_dict())
        get_logger().info("final fit: %d epoch(s) on train + valid in %.0f s", chosen["best_epoch"],
                          final["train_seconds"])
        final["train_targets"] = int(prepared.train_all.n_targets)
        training = {key: value for key, value in chosen.items() if key != "test"}
        training.update(final_fit=final, selection={"test": chosen["test"], "best_epoch": chosen["best_epoch"]},
                        train_seconds=chosen["train_seconds"] + final["train_seconds"])
        return training

    def _train_and_fit_post(self, model, log: SequenceData, directory, config: GeoRunConfig, data: GeoData,
                            on_epoch_end, *, epochs: int | None = None, precision: str | None = None) -> dict:
        """Train `model` on the examples of `log` (resuming from `directory`'s checkpoint). Without
        `epochs`: the best epoch chosen on validation, then the post-training stage fitted on
        validation. With `epochs` (a final fit): that many epochs, no validation, the lr schedule's
        horizon still `train.epochs`."""
        train_streams = ActionStreams(log, config.examples)
        monitor = config.train.monitor or f"{model.levels[-1]}_MRR"
        settings = config.train.trainer_settings(monitor=monitor, monitor_mode="max")
        if epochs is not None:
            settings = dataclasses.replace(settings, epochs=epochs, schedule_epochs=config.train.epochs, monitor=None,
                                           patience=None, precision=precision or settings.precision)
        drawn: dict[int, Examples] = {}

        def examples_for(epoch: int) -> Examples:
            seed = config.examples.seed + (epoch if config.train.resample_each_epoch else 0)
            if seed not in drawn:
                drawn.clear()
                drawn[seed], _ = sample_examples(log, config.examples, seed=seed, streams=train_streams,
                                                 active_per_target=config.train.active_per_target)
            return drawn[seed]

        def batches(epoch: int):
            return training_batches(train_streams, examples_for(epoch), config.train.batch_size,
                                    config.train.seed * 1_000_003 + epoch)

        def steps(epoch: int) -> int:
            return -(-len(examples_for(epoch)) // config.train.batch_size)

        def validate(current) -> dict:
            valid_streams, valid_examples = self.valid_examples(config, data)
            results = evaluate_geo(current, valid_streams, valid_examples, config.eval,
                                   train_leaves=target_leaves(data.prepared.train))
            values = flat_validation(results)
            if monitor not in values:
                raise ConfigError(f"key 'train.monitor': {monitor!r} is not a validation metric; "
                                  f"choose from {sorted(values)}")
            return values

        started = time.perf_counter()
        state = fit_trainable(model, settings, directory, batches, steps,
                              validate=validate if epochs is None else None, on_epoch_end=on_epoch_end)
        train_seconds = time.perf_counter() - started
        summary = {"history": state.history, "best_epoch": state.best_epoch or state.epoch,
                   "train_seconds": train_seconds, "precision": state.precision,
                   "epoch_seconds": float(np.mean([h["epoch_seconds"] for h in state.history]))
                   if state.history else None}
        if epochs is None:                 # the post-training stage, on the validation examples
            valid_streams, valid_examples = self.valid_examples(config, data)
            blend = fit_post_training(model, valid_streams, valid_examples, config.eval.batch_size, config.eval.ks)
            save_weights(directory / WEIGHTS_FILE, model.state_dict())
            summary.update({**({"reference_blend": blend} if blend else {}),
                            "examples": {"valid": valid_examples.counts()}})
        return summary

    def valid_examples(self, config: GeoRunConfig, data: GeoData) -> tuple[ActionStreams, Examples]:
        """The validation examples (a fixed sample of `train.valid_max_targets`), drawn once per run."""
        if data.valid is None:
            data.valid = split_examples(data.prepared.valid, config.examples,
                                        max_targets=config.train.valid_max_targets, seed=config.eval.seed)
        return data.valid

    def test_examples(self, config: GeoRunConfig, data: GeoData) -> tuple[ActionStreams, Examples]:
        """The test examples, drawn once per run and shared by every model."""
        if data.test is None:
            data.test = split_examples(data.prepared.test, config.examples, max_targets=config.eval.max_targets,
                                       seed=config.eval.seed)
        return data.test

    def refit_main(self, label: str, run: RunDir, config: GeoRunConfig, data: GeoData, previous: dict
                   ) -> tuple[Any, dict]:
        """The trained weights (the post-training buffers may be missing or left over), the
        reference's training shares, then the post-training stage fitted on validation as `fit` does."""
        from hmtrec.rundir import load_weights

        model = self.build(label, run, config, data)
        model.load_state_dict(load_weights(run.path / WEIGHTS_FILE))
        valid_streams, valid_examples = self.valid_examples(config, data)
        started = time.perf_counter()
        if config.train.final_fit:   # fitted on the selection model, which has not trained on valid
            from hmtrec.models.sequence.geo_post import adopt_post_training

            selection = self.build(label, run, config, data)
            selection.load_state_dict(load_weights(run.path / SELECTION_DIR / WEIGHTS_FILE))
            if getattr(selection, "uses_reference", False):
                selection.fit_prior(data.prepared.train)
            record = fit_post_training(selection, valid_streams, valid_examples, config.eval.batch_size,
                                       config.eval.ks)
            save_weights(run.path / SELECTION_DIR / WEIGHTS_FILE, selection.state_dict())
            adopt_post_training(model, selection)
        else:
            record = fit_post_training(model, valid_streams, valid_examples, config.eval.batch_size, config.eval.ks)
        save_weights(run.path / WEIGHTS_FILE, model.state_dict())
        training = {key: value for key, value in previous.items() if key not in ("test", "reference_blend")}
        return model, {**training, **({"reference_blend": record} if record else {}),
                       "refit_seconds": time.perf_counter() - started}

    def evaluate_model(self, label: str, model, run: RunDir | None, config: GeoRunConfig, data: GeoData,
                       training: dict | None) -> dict:
        streams, examples = self.test_examples(config, data)
        return evaluate_geo(model, streams, examples, config.eval, train_leaves=data.train_leaves)

    def summary(self, config: GeoRunConfig, data: GeoData, results: dict[str, dict],
                training: dict[str, dict]) -> dict:
        return {"test": results, **training[config.model["name"]]}

    def report(self, run: RunDir, config: GeoRunConfig, data: GeoData, results: dict, metrics: dict) -> None:
        print_geo_results(results)
        get_logger().info("test: %s", {name: r["overall"] for name, r in results.items()})

    # `hmtrec evaluate`: the saved model, the baselines of the (possibly overridden) config refitted
    def load_saved(self, run: RunDir, config: GeoRunConfig, info: dict):
        _, model, _ = load_geo_run(run.path)
        return model

    def ready(self, model, config: GeoRunConfig, data: GeoData, info: dict) -> dict:
        models = {info["model"]: model}
        for name in config.baselines:
            baseline = build_model(config, data.prepared.dataset.taxonomy, info["event_types"], {"name": name})
            baseline.fit(data.fitting_log)
            models[name] = baseline
        return models

    def evaluation_record(self, overrides: list[str], results: dict[str, dict]) -> dict:
        return {"test": results, "overrides": list(overrides)}

    def evaluation_result(self, record: dict) -> dict:
        return {"test": record["test"]}

    def print_evaluation(self, config: GeoRunConfig, data: GeoData, results: dict[str, dict]) -> None:
        print_geo_results(results)


GeoPipeline = GeoKind  # the older name
