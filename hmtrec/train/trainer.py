"""The training loop shared by every torch model.

Contract: the model has `loss(batch) -> (scalar tensor, {name: float})`. Batches come from a
callable `batches(epoch) -> iterable`, which must be deterministic given the epoch (seed it with
seed + epoch), so a run resumed from the checkpoint of epoch e replays exactly what an
uninterrupted run would have done from e + 1 on.

Also here: the learning-rate schedule (a pure function of the step count, so resuming needs only
the step and the horizon, both in the checkpoint), the wall-clock budget, and `precision: auto`
(bf16 only where the processor has native bf16 units and a timed probe finds it faster).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from hmtrec.progress import end_epoch, epoch_summary, progress_bar
from hmtrec.train.callbacks import notify_epoch_end
from hmtrec.train.distributed import prepare_batches
from hmtrec.rundir import get_logger, load_tensors, save_tensors, save_weights

try:   # the benchmarks' own measure (stdlib only); it needs the resource module, which Windows lacks
    from hmtrec.bench.child import peak_rss_mb
except ImportError:
    peak_rss_mb = None

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


def check_device(name: str) -> None:
    """Fail with a clear message on a device torch does not know or this machine lacks."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA device (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps or auto")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---- precision -------------------------------------------------------------------------------

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_MIN_GAIN = 1.1    # bf16 must be this much faster than fp32 in the probe to be chosen


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_probe_cache: dict[tuple, tuple[str, str]] = {}


def probe_clock(device: torch.device) -> Callable[[], float]:
    """The clock the precision probe times steps with. On CPU the process's CPU time: other
    processes on a shared machine stretch wall time at random (a probe beside 3 training
    processes once timed bf16 at 1.9x fp32 and chose fp32, which then trained 1.7x slower), but
    not the work a step does. On an accelerator, wall time (the host is idle while it waits)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def choose_precision(device: torch.device, probe: Callable[[str], float] | None = None, *,
                     flags: set[str] | None = None, cache_key: tuple | None = None) -> tuple[str, str]:
    """("fp32" or "bf16", why) for `precision: auto`. On a CPU without native bf16 units bf16 is
    emulated (about 16x slower measured on an AVX2-only Xeon), so fp32; with them, `probe(precision)`
    (seconds of a few training steps) decides, bf16 only if clearly faster. Probe results are cached
    per process under `cache_key`. `flags` overrides the CPU's flags (tests)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", "CUDA device without bf16 support"
    if device.type != "cpu":
        return "fp32", f"device type {device.type!r}: fp32"
    flags = cpu_flags() if flags is None else flags
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if not native:
        return "fp32", f"the CPU has no native bf16 ({' / '.join(NATIVE_BF16_FLAGS)} absent): bf16 would be emulated"
    if probe is None:
        return "bf16", f"the CPU has native bf16 ({', '.join(native)})"
    if cache_key is not None and cache_key in _probe_cache:
        return _probe_cache[cache_key]
    # alternate the two, twice, and keep each one's best: what CPU time still feels of other
    # processes (shared caches, clock speed) then touches both alike
    fp32_seconds, bf16_seconds = probe("fp32"), probe("bf16")
    fp32_seconds, bf16_seconds = min(fp32_seconds, probe("fp32")), min(bf16_seconds, probe("bf16"))
    ratio = fp32_seconds / max(bf16_seconds, 1e-12)
    choice = "bf16" if ratio >= PROBE_MIN_GAIN else "fp32"
    why = (f"CPU has native bf16 ({', '.join(native)}); timed probe (CPU time): fp32 {fp32_seconds * 1e3:.1f} ms, "
           f"bf16 {bf16_seconds * 1e3:.1f} ms per step ({ratio:.2f}x; bf16 needs {PROBE_MIN_GAIN:g}x)")
    if cache_key is not None:
        _probe_cache[cache_key] = (choice, why)
    return choice, why


# ---- learning-rate schedule ------------------------------------------------------------------

def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, floor: float) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based): linear warm-up
    from 1/warmup to 1 over `warmup_steps`, then constant, or a cosine or linear decay to `floor`
    at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, cosine or linear")


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
    fit_seconds: float = 0.0        # training plus validation: what the wall-clock budget counts
    fit_cpu_seconds: float = 0.0    # the same in process CPU seconds (all threads)
    stopped_by_budget: bool = False
    precision: str | None = None    # what `auto` resolved to, kept so a resumed run uses the same
    precision_reason: str = ""
    total_steps: int | None = None  # the lr schedule's horizon, fixed at the first epoch
    sparse_updates: bool | None = None  # what `sparse_updates` resolved to, kept so a resumed run uses the same


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
    precision: str = "fp32"         # "bf16": forward and loss under bfloat16 autocast (weights stay fp32);
                                    # "auto": see choose_precision
    lr_schedule: str = "constant"   # constant, cosine or linear decay after the warm-up
    warmup_fraction: float = 0.0    # share of all steps spent warming up linearly
    lr_floor: float = 0.0           # the decay ends at lr * lr_floor
    budget_minutes: float | None = None   # stop after the epoch whose end passes this much fit time
    budget_clock: str = "wall"      # "wall": elapsed time; "cpu": process CPU time / torch threads, the
                                    # time an idle machine would need, unaffected by other processes
    monitor_label: str | None = None  # the monitored metric's name in progress lines (default: monitor)
    sparse_updates: bool | str = False  # True, False or "auto": sparse gradients and lazy Adam for the
                                        # tables the model's `enable_sparse_gradients` names (see
                                        # resolve_sparse_updates)
    schedule_epochs: int | None = None  # the lr schedule's horizon in epochs (None: epochs); a final fit
                                        # trains fewer epochs along the selection run's curve


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
        self._sparse_configured = False
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
        self.state = TrainState(**saved["state"])
        if self.state.sparse_updates is None:   # saved before the switch existed: trained dense
            self.state.sparse_updates = False
        self._configure_sparse_updates()
        self.optimizer.load_state_dict(saved["optimizer"])
        self.log.info("resumed from %s after epoch %d", path, self.state.epoch)
        return True

    # ---- sparse updates --------------------------------------------------------------------
    def _configure_sparse_updates(self) -> None:
        """Resolve `sparse_updates` once per run (a resumed run keeps its first choice) and, when on,
        switch the model's item tables to sparse gradients with their own lazy Adam."""
        if self._sparse_configured:
            return
        self._sparse_configured = True
        if self.state.sparse_updates is None:
            self.state.sparse_updates = resolve_sparse_updates(self.settings, self.model)
        if not self.state.sparse_updates:
            return
        sparse = list(self.model.enable_sparse_gradients())
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.model.parameters() if id(p) not in sparse_ids]
        self.optimizer = SparseDenseAdam(sparse, dense, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.log.info("sparse updates: %d item table(s) (%s parameters) step with lazy Adam",
                      len(sparse), f"{sum(p.numel() for p in sparse):,}")

    # ---- loop ------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        best = self.state.best_value
        if best is None or math.isnan(best):
            return not math.isnan(value)
        return value > best if self.settings.monitor_mode == "max" else value < best

    def _resolve_precision(self, batches: Callable[[int], Iterable[dict]]) -> str:
        """fp32 or bf16; `auto` is resolved once per run (a resumed run keeps its first choice)."""
        if self.settings.precision != "auto":
            return self.settings.precision
        if self.state.precision is None:
            probe_batch = None
            for probe_batch in batches(1):
                break
            probe = None
            if probe_batch is not None:
                probe_batch = move_to(probe_batch, self.device)
                probe = lambda precision: self._time_steps(probe_batch, precision)  # noqa: E731
            key = (type(self.model).__name__, self.device.type, count_parameters(self.model),
                   tuple(tuple(v.shape) for v in probe_batch.values() if isinstance(v, torch.Tensor))
                   if probe_batch is not None else ())
            self.state.precision, self.state.precision_reason = choose_precision(self.device, probe, cache_key=key)
        self.log.info("precision auto -> %s: %s", self.state.precision, self.state.precision_reason)
        return self.state.precision

    def _time_steps(self, batch: dict, precision: str, repeats: int = 2) -> float:
        """Fastest of `repeats` forward + backward passes on `batch` (after one warm-up); the
        gradients are thrown away, so the probe leaves the weights as they were."""
        self.model.train()
        clock = probe_clock(self.device)
        times = []
        for attempt in range(repeats + 1):
            started = clock()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = self.model.loss(batch)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if attempt:
                times.append(clock() - started)
        self.optimizer.zero_grad(set_to_none=True)
        return min(times)

    def _schedule_horizon(self, steps_per_epoch: Callable[[int], int] | None) -> int | None:
        settings = self.settings
        if settings.lr_schedule == "constant" and settings.warmup_fraction == 0:
            return None
        if self.state.total_steps is None:
            if steps_per_epoch is None:
                raise ValueError("an lr schedule needs the number of steps per epoch, which this model's "
                                 "batches do not report")
            self.state.total_steps = (settings.schedule_epochs or settings.epochs) * steps_per_epoch(1)
        return self.state.total_steps

    def _set_lr(self, horizon: int | None) -> float:
        settings = self.settings
        if horizon is None:
            return settings.lr
        warmup = int(round(settings.warmup_fraction * horizon))
        lr = settings.lr * lr_factor(self.state.step, horizon, settings.lr_schedule, warmup, settings.lr_floor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _budget_spent(self) -> float:
        """Seconds counted against the budget so far, on the configured clock."""
        if self.settings.budget_clock == "cpu":
            return self.state.fit_cpu_seconds / max(torch.get_num_threads(), 1)
        return self.state.fit_seconds

    def fit(self, batches: Callable[[int], Iterable[dict]], steps_per_epoch: Callable[[int], int] | None = None
            ) -> TrainState:
        settings = self.settings
        if settings.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {settings.precision!r}")
        lr_factor(0, 1, settings.lr_schedule, 0, settings.lr_floor)  # an unknown schedule fails now
        if settings.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {settings.budget_clock!r}")
        self.try_resume()
        self._configure_sparse_updates()
        if self.state.stopped_by_budget and (settings.budget_minutes is None
                                             or self._budget_spent() < settings.budget_minutes * 60):
            self.state.stopped_by_budget = False   # resumed with a larger budget: train on
        bf16 = self._resolve_precision(batches) == "bf16"
        horizon = self._schedule_horizon(steps_per_epoch)
        best_state = None
        if self.run_dir is not None and (self.run_dir / BEST_WEIGHTS).exists() and self.state.epoch > 0:
            from hmtrec.rundir import load_weights
            best_state = load_weights(self.run_dir / BEST_WEIGHTS)
        batches, steps_per_epoch = prepare_batches(self, batches, steps_per_epoch)  # DDP, loader workers
        with progress_bar() as bar:
            while (self.state.epoch < settings.epochs and not self.state.stopped_early
                   and not self.state.stopped_by_budget):
                epoch = self.state.epoch + 1
                seed_everything(settings.seed * 100_003 + epoch)
                self.model.train()
                total = steps_per_epoch(epoch) if steps_per_epoch else None
                task = bar.add_task(f"epoch {epoch}/{settings.epochs}", total=total, info="")
                started, cpu_started = time.perf_counter(), time.process_time()
                loss_sum, parts_sum, n_steps = 0.0, {}, 0
                lr = settings.lr
                for batch in batches(epoch):
                    batch = move_to(batch, self.device)
                    lr = self._set_lr(horizon)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss, parts = self.model.loss(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if settings.grad_clip:
                        clip_gradients(self.model.parameters(), settings.grad_clip)
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
                # CPU seconds beside wall seconds: on a shared machine the wall clock counts the
                # other processes too
                record = {"epoch": epoch, "loss": loss_sum / max(n_steps, 1), "epoch_seconds": epoch_seconds,
                          "epoch_cpu_seconds": time.process_time() - cpu_started, "lr": lr, **{f"loss_{k}": v / max(n_steps, 1) for k, v in parts_sum.items()},
                          # what the model and its optimizer hold, beside a run's peak RSS
                          "model_bytes": tensor_bytes(self.model.parameters()),
                          "optimizer_bytes": optimizer_state_bytes(self.optimizer),
                          # the process's peak so far, before validation: loading and training's memory
                          "peak_rss_bytes": None if peak_rss_mb is None else int(peak_rss_mb() * 2**20)}
                if self.validate is not None:
                    validation_started = time.perf_counter()
                    self.model.eval()
                    with torch.no_grad():
                        record.update({f"valid_{k}": v for k, v in self.validate(self.model).items()})
                    self.model.train()
                    record["valid_seconds"] = time.perf_counter() - validation_started
                self.state.fit_seconds += time.perf_counter() - started
                self.state.fit_cpu_seconds += time.process_time() - cpu_started
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
                spent = self._budget_spent()
                if (settings.budget_minutes is not None and epoch < settings.epochs and not self.state.stopped_early
                        and spent >= settings.budget_minutes * 60):
                    self.state.stopped_by_budget = True
                    self.log.info("%s budget of %g min reached after epoch %d (%.0f s of training and validation); "
                                  "stopping", settings.budget_clock, settings.budget_minutes, epoch, spent)
                self.save_checkpoint()
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self.state)
                notify_epoch_end(self, self.state)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return self.state


def resolve_sparse_updates(settings: TrainerSettings, model: torch.nn.Module) -> bool:
    """Whether a run trains the model's item tables with sparse gradients and lazy Adam. `auto`: where
    the model offers it (`sparse_gradients_available`, e.g. HierSRec with item_loss: sampled), with no
    weight decay (lazy Adam has none) and in one process (DDP would all-reduce sparse gradients)."""
    from hmtrec.errors import ConfigError

    value = settings.sparse_updates
    if value not in (True, False, "auto"):
        raise ConfigError(f"key 'train.sparse_updates': expected true, false or auto, got {value!r}")
    if value is False:
        return False
    offered = getattr(model, "sparse_gradients_available", False)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if value == "auto":
        return bool(offered) and settings.weight_decay == 0 and not distributed
    reason = ("the model trains no table sparsely (HierSRec with model.item_loss: sampled does)" if not offered
              else "lazy Adam has no weight decay: set train.weight_decay: 0" if settings.weight_decay
              else "not under torchrun (data-parallel training all-reduces dense gradients)" if distributed
              else None)
    if reason:
        raise ConfigError(f"key 'train.sparse_updates': true needs {reason}")
    return True


class LazyAdam(torch.optim.Optimizer):
    """Adam for parameters with sparse gradients (embedding tables looked up with sparse=True): a
    step updates only the rows in its gradient, each by exactly AdamW's update without weight decay
    (the same moments, bias corrections and eps), with the step count shared by all rows. A row a
    step does not touch keeps its weights and moments, where dense AdamW would move it on its
    momentum. torch.optim.SparseAdam is not used: it adds eps before the bias correction, which for
    small gradients is another update."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients (an embedding looked up with sparse=True)")
                grad = grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values,
                                                                                            value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
                denominator = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                updated = param.index_select(0, rows).addcdiv_(exp_avg, denominator,
                                                               value=-group["lr"] / bias_correction1)
                param.index_copy_(0, rows, updated)
        return None


class SparseDenseAdam:
    """LazyAdam for the parameters with sparse gradients (a model's item tables) and AdamW for the
    rest: on the first step, and on rows every step touches, the same as AdamW without weight
    decay. Exposes what the Trainer uses of an optimizer."""

    def __init__(self, sparse: list[torch.nn.Parameter], dense: list[torch.nn.Parameter], *, lr: float,
                 weight_decay: float = 0.0):
        if weight_decay:
            raise ValueError("SparseDenseAdam: lazy Adam has no weight decay")
        self.optimizers = [LazyAdam(sparse, lr=lr)]
        if dense:
            self.optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=0.0))

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if "optimizers" not in state or len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not a sparse/dense pair (trained with other "
                             "train.sparse_updates)")
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm over all gradients), also over sparse gradients,
    which torch's does not take: they are coalesced and their values count once each."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    for p in parameters:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    total = torch.nn.utils.get_total_norm([p.grad.values() if p.grad.is_sparse else p.grad for p in parameters])
    dense = [p for p in parameters if not p.grad.is_sparse]
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)    # the factor clip_grads_with_norm_ applies
    for p in parameters:
        if p.grad.is_sparse:
            p.grad = torch.sparse_coo_tensor(p.grad.indices(), p.grad.values() * scale, p.grad.shape,
                                             is_coalesced=True, check_invariants=False)
    return total


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an optimizer's state tensors (Adam's moments), over SparseDenseAdam's parts too."""
    parts = getattr(optimizer, "optimizers", [optimizer])
    return sum(tensor_bytes(v for state in part.state.values() for v in state.values() if isinstance(v, torch.Tensor))
               for part in parts)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
