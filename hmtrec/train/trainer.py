"""The training loop shared by every torch model.

Contract: the model has `loss(batch) -> (scalar tensor, {name: float})`. Batches come from a
callable `batches(epoch) -> iterable`, which must be deterministic given the epoch (seed it with
seed + epoch), so a run resumed from the checkpoint of epoch e replays exactly what an
uninterrupted run would have done from e + 1 on.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from hmtrec.progress import end_epoch, epoch_summary, progress_bar
from hmtrec.train.run_dir import get_logger, load_tensors, save_tensors, save_weights

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.safetensors"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainState:
    epoch: int = 0                  # epochs completed
    step: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False     # so a resumed run that had already stopped does not train on


@dataclass
class TrainerSettings:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    seed: int = 0
    device: str = "cpu"
    monitor: str | None = None      # key of the validation dict to select the best epoch on
    monitor_mode: str = "max"
    patience: int | None = None     # stop after this many epochs without improvement
    resume: bool = True
    precision: str = "fp32"         # "bf16": forward and loss under bfloat16 autocast (weights stay fp32)
    monitor_label: str | None = None  # the monitored metric's name in progress lines (default: monitor)


def move_to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


class Trainer:
    def __init__(self, model: torch.nn.Module, settings: TrainerSettings, run_dir: str | Path | None = None,
                 validate: Callable[[torch.nn.Module], dict] | None = None,
                 on_epoch_end: Callable[[TrainState], None] | None = None):
        self.model = model
        self.settings = settings
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.validate = validate
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(settings.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.state = TrainState()
        self.log = get_logger()

    # ---- checkpoints -----------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    def save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        save_tensors(path, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
        })

    def try_resume(self) -> bool:
        path = self._checkpoint_path()
        if path is None or not self.settings.resume or not path.exists():
            return False
        saved = load_tensors(path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = TrainState(**saved["state"])
        self.log.info("resumed from %s after epoch %d", path, self.state.epoch)
        return True

    # ---- loop ------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        best = self.state.best_value
        if best is None or math.isnan(best):
            return not math.isnan(value)
        return value > best if self.settings.monitor_mode == "max" else value < best

    def fit(self, batches: Callable[[int], Iterable[dict]], steps_per_epoch: Callable[[int], int] | None = None
            ) -> TrainState:
        settings = self.settings
        if settings.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {settings.precision!r}")
        bf16 = settings.precision == "bf16"
        self.try_resume()
        best_state = None
        if self.run_dir is not None and (self.run_dir / BEST_WEIGHTS).exists() and self.state.epoch > 0:
            from hmtrec.train.run_dir import load_weights
            best_state = load_weights(self.run_dir / BEST_WEIGHTS)
        with progress_bar() as bar:
            while self.state.epoch < settings.epochs and not self.state.stopped_early:
                epoch = self.state.epoch + 1
                seed_everything(settings.seed * 100_003 + epoch)
                self.model.train()
                total = steps_per_epoch(epoch) if steps_per_epoch else None
                task = bar.add_task(f"epoch {epoch}/{settings.epochs}", total=total, info="")
                started = time.perf_counter()
                loss_sum, parts_sum, n_steps = 0.0, {}, 0
                for batch in batches(epoch):
                    batch = move_to(batch, self.device)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss, parts = self.model.loss(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if settings.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
                    self.optimizer.step()
                    n_steps += 1
                    self.state.step += 1
                    loss_sum += float(loss.detach())
                    for key, value in parts.items():
                        value = value.detach() if isinstance(value, torch.Tensor) else value
                        parts_sum[key] = parts_sum.get(key, 0.0) + float(value)
                    bar.update(task, advance=1, info=f"loss {loss_sum / n_steps:.4f}")
                epoch_seconds = time.perf_counter() - started
                self.state.train_seconds += epoch_seconds
                record = {"epoch": epoch, "loss": loss_sum / max(n_steps, 1), "epoch_seconds": epoch_seconds,
                          **{f"loss_{k}": v / max(n_steps, 1) for k, v in parts_sum.items()}}
                if self.validate is not None:
                    self.model.eval()
                    with torch.no_grad():
                        record.update({f"valid_{k}": v for k, v in self.validate(self.model).items()})
                    self.model.train()
                self.state.epoch = epoch
                self.state.history.append(record)
                if settings.monitor is not None:
                    value = float(record[f"valid_{settings.monitor}"])
                    if self._improved(value):
                        self.state.best_value, self.state.best_epoch = value, epoch
                        self.state.epochs_without_improvement = 0
                        best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
                        if self.run_dir is not None:
                            save_weights(self.run_dir / BEST_WEIGHTS, best_state)
                    else:
                        self.state.epochs_without_improvement += 1
                end_epoch(bar, task, epoch_summary(record, settings.monitor, self.state.best_value,
                                                   self.state.best_epoch, settings.epochs,
                                                   label=settings.monitor_label))
                self.log.info("epoch %d: %s", epoch, {k: round(v, 5) if isinstance(v, float) else v
                                                      for k, v in record.items()})
                if settings.patience is not None and self.state.epochs_without_improvement >= settings.patience:
                    self.state.stopped_early = True
                    self.log.info("early stop after epoch %d (best epoch %d)", epoch, self.state.best_epoch)
                self.save_checkpoint()
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self.state)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return self.state
