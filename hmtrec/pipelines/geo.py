"""The geo pipeline (config kind "geo"): next-destination prediction from user-action streams.

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

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from hmtrec.config import StrictModel, dump_config, load_config, register_config
from hmtrec.data.actions import (DEFAULT_EVENT_TYPE, ActionStreams, Examples, ExampleSettings, log_event_types,
                                 sample_examples)
from hmtrec.data.loading import DataConfig, PreparedData, load_data
from hmtrec.data.sequences import SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.evaluate.geo import GeoEvalSettings, evaluate_geo, print_geo_results
from hmtrec.models.registry import build_model as build_registered, get_model, validate_model_params
from hmtrec.pipelines import register_pipeline
from hmtrec.progress import console
from hmtrec.rundir import RunDir
from hmtrec.serve.artefact import build_geo_model as build_model, load_geo_run  # noqa: F401 (re-exported)
from hmtrec.train.run_dir import close_run_dir, get_logger, load_weights, open_run_dir, read_json, save_weights, write_json
from hmtrec.train.trainer import Trainer, TrainerSettings, seed_everything

WEIGHTS_FILE = "model.safetensors"
TAXONOMY_FILE = "taxonomy.json"


class GeoTrain(StrictModel):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = 5.0
    seed: int = 0
    monitor: str | None = None       # validation key, e.g. "cell_MRR"; default: MRR of the finest level
    patience: int | None = 2
    resample_each_epoch: bool = True  # fresh dormant offsets (and target sub-sample) every epoch
    valid_max_targets: int | None = Field(2000, ge=1)  # validation target events (fixed sample) per epoch
    device: str = "cpu"
    threads: int | None = Field(2, ge=1)  # torch intra-op threads (None: torch's default)
    # active examples per training target and epoch, drawn from T-1 .. T-active_days (None: all of
    # them); the days of one target share most of their history, so fewer cost little signal
    active_per_target: int | None = Field(None, ge=1)


class GeoEval(GeoEvalSettings):
    max_targets: int | None = Field(None, ge=1)  # sub-sample test target events (fixed seed); None: all
    seed: int = 0


@register_config("geo")
class GeoRunConfig(StrictModel):
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


def flat_validation(results: dict) -> dict[str, float]:
    return {f"{level}_{metric}": value for level, metrics in results["overall"].items()
            for metric, value in metrics.items()}


# ---- the pipeline ----------------------------------------------------------------------------
@register_pipeline("geo")
class GeoPipeline:
    def _prepare(self, config: GeoRunConfig) -> PreparedData:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        prepared = load_data(config.data)
        for split in ("train", "valid", "test"):
            if getattr(prepared, split).timestamps is None:
                raise ConfigError(f"key 'data.source': {config.data.source!r} gives no timestamps; "
                                  "geo examples need event times")
        return prepared

    def _evaluate_all(self, config: GeoRunConfig, models: dict[str, Any], prepared: PreparedData) -> dict[str, dict]:
        streams, examples = split_examples(prepared.test, config.examples, max_targets=config.eval.max_targets,
                                           seed=config.eval.seed)
        train_leaves = prepared.train.leaves[prepared.train.targets()]
        return {name: evaluate_geo(model, streams, examples, config.eval, train_leaves=train_leaves)
                for name, model in models.items()}

    def train(self, config: GeoRunConfig, run_dir: Path) -> dict:
        run = RunDir.begin(run_dir, config, models=[config.model["name"], *config.baselines],
                           model=config.model["name"])
        run_dir = run.path
        log = get_logger()
        try:
            prepared = self._prepare(config)
            taxonomy = prepared.dataset.taxonomy
            taxonomy.save(run_dir / TAXONOMY_FILE)
            event_types = log_event_types(prepared.train)
            model_name = config.model["name"]
            run.update(event_types=event_types)
            seed_everything(config.train.seed)       # the initial weights depend on the seed only
            model = build_model(config, taxonomy, event_types)
            set_coordinates(model, config.data, taxonomy)
            train_streams = ActionStreams(prepared.train, config.examples)
            valid_streams, valid_examples = split_examples(prepared.valid, config.examples,
                                                           max_targets=config.train.valid_max_targets,
                                                           seed=config.eval.seed)
            train_leaves = prepared.train.leaves[prepared.train.targets()]
            finest = model.levels[-1]
            monitor = config.train.monitor or f"{finest}_MRR"
            settings = TrainerSettings(epochs=config.train.epochs, lr=config.train.lr,
                                       weight_decay=config.train.weight_decay, grad_clip=config.train.grad_clip,
                                       seed=config.train.seed, device=config.train.device, monitor=monitor,
                                       monitor_mode="max", patience=config.train.patience)

            drawn: dict[int, Examples] = {}

            def examples_for(epoch: int) -> Examples:
                seed = config.examples.seed + (epoch if config.train.resample_each_epoch else 0)
                if seed not in drawn:
                    drawn.clear()
                    drawn[seed], _ = sample_examples(prepared.train, config.examples, seed=seed,
                                                     streams=train_streams,
                                                     active_per_target=config.train.active_per_target)
                return drawn[seed]

            def batches(epoch: int):
                return training_batches(train_streams, examples_for(epoch), config.train.batch_size,
                                        config.train.seed * 1_000_003 + epoch)

            def steps(epoch: int) -> int:
                return -(-len(examples_for(epoch)) // config.train.batch_size)

            def validate(current) -> dict:
                results = evaluate_geo(current, valid_streams, valid_examples, config.eval, train_leaves=train_leaves)
                values = flat_validation(results)
                if monitor not in values:
                    raise ConfigError(f"key 'train.monitor': {monitor!r} is not a validation metric; "
                                      f"choose from {sorted(values)}")
                return values

            started = time.perf_counter()
            state = Trainer(model, settings, run_dir, validate=validate).fit(batches, steps)
            train_seconds = time.perf_counter() - started
            save_weights(run_dir / WEIGHTS_FILE, model.state_dict())

            models = {model_name: model}
            for name in config.baselines:
                baseline = build_model(config, taxonomy, event_types, {"name": name})
                baseline.fit(prepared.train)
                models[name] = baseline
            test = self._evaluate_all(config, models, prepared)
            metrics = {"test": test, "history": state.history, "best_epoch": state.best_epoch,
                       "train_seconds": train_seconds,
                       "epoch_seconds": float(np.mean([h["epoch_seconds"] for h in state.history]))
                       if state.history else None,
                       "examples": {"valid": valid_examples.counts()}}
            write_json(run_dir / "metrics.json", metrics)
            print_geo_results(test)
            log.info("test: %s", {name: r["overall"] for name, r in test.items()})
            run.finish()
            return metrics
        finally:
            run.close()

    def evaluate(self, run_dir: Path, overrides: list[str]) -> dict:
        run_dir = Path(run_dir)
        bad = [item for item in overrides if not item.startswith(("eval.", "examples.", "baselines"))]
        if bad:
            raise ConfigError(f"--set {bad[0]!r}: evaluation may only override eval.*, examples.* or baselines")
        config, model, taxonomy = load_geo_run(run_dir)
        config = load_config(run_dir / "config.yaml", overrides)
        prepared = self._prepare(config)
        info = read_json(run_dir / "run.json")
        models = {info["model"]: model}
        for name in config.baselines:
            baseline = build_model(config, taxonomy, info["event_types"], {"name": name})
            baseline.fit(prepared.train)
            models[name] = baseline
        test = self._evaluate_all(config, models, prepared)
        write_json(run_dir / "evaluation.json", {"test": test, "overrides": overrides})
        print_geo_results(test)
        return {"test": test}
