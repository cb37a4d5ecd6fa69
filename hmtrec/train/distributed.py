"""Data-parallel training with PyTorch's DistributedDataParallel, launched by `torchrun`, and a
DataLoader with worker processes for the batches.

    torchrun --standalone --nproc-per-node 2 -m hmtrec.cli train -c configs/quickstart.yaml -o runs/ddp

Every rank runs the same pipeline (data loading, validation, evaluation) on the same data; only the
training batches are divided: each rank takes its slice of the rows of every batch, so
`train.batch_size` stays the GLOBAL batch and the same config optimises the same objective as one
process (DDP averages the gradients of the slices). What differs from one process: each slice's loss
is a mean over its own targets (not over the whole batch's), and dropout draws differ, so metrics
match one process within a tolerance (see docs/scale.md), not bit for bit. Only rank 0 writes the
run directory (the others write to a scratch directory that is deleted) and logs to MLflow; a run
resumed under torchrun restores rank 0's checkpoint on every rank.

Backend: NCCL when the config's device is CUDA (rank r uses GPU LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hmtrec.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """What torchrun says about this process (one process, rank 0 of 1, without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Launch":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Set by `hmtrec train --loader-workers N`; read when a Trainer starts fitting.
_LOADER_WORKERS = 0


def set_loader_workers(workers: int) -> None:
    global _LOADER_WORKERS
    if workers < 0:
        raise ConfigError(f"--loader-workers: expected 0 or more, got {workers}")
    _LOADER_WORKERS = workers


@contextmanager
def session(device: str) -> Iterator[Launch]:
    """Join the process group torchrun describes (nothing to do in a single process)."""
    launch = Launch.from_env()
    if not launch.distributed:
        yield launch
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(launch.local_rank)  # so device "cuda" means this rank's GPU
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if launch.rank != 0:  # one console: rank 0's (every rank's log still goes to its own run directory)
        from hmtrec.progress import console

        console.quiet = True
    try:
        yield launch
    finally:
        dist.destroy_process_group()


@contextmanager
def rank_run_dir(run_dir: Path, launch: Launch) -> Iterator[Path]:
    """Rank 0 writes the run directory; every other rank writes to a scratch one, deleted after."""
    if launch.rank == 0:
        yield Path(run_dir)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"hmtrec-rank{launch.rank}-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---- the Trainer's hook -------------------------------------------------------------------------

class _LossForward(torch.nn.Module):
    """DDP synchronises gradients of what its forward computed: make `model.loss(batch)` the forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return type(self.model).loss(self.model, batch)


def prepare_batches(trainer, batches: Callable[[int], Iterable[dict]], steps_per_epoch):
    """Called by `Trainer.fit` once the checkpoint (if any) is restored: under torchrun, wrap the
    model's loss in DDP and give this rank its slice of every batch; with loader workers, build the
    batches in a DataLoader's worker processes. Returns the (possibly new) batches and step count."""
    if _LOADER_WORKERS > 0:
        batches = _in_loader(batches, _LOADER_WORKERS)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _wrap_in_ddp(trainer)
        batches = _row_slices(batches, dist.get_rank(), dist.get_world_size())
    return batches, steps_per_epoch


def _wrap_in_ddp(trainer) -> None:
    model = trainer.model
    if callable(getattr(model, "training_batches", None)):
        raise ConfigError(f"{type(model).__name__} builds its own training batches (state carried from batch to "
                          f"batch), which cannot be divided across ranks; train it in one process")
    _sync_resumed_state(trainer)
    device_ids = [trainer.device.index or 0] if trainer.device.type == "cuda" else None
    # find_unused_parameters: models may leave parts out of a loss (e.g. a level without targets in a batch)
    ddp = torch.nn.parallel.DistributedDataParallel(_LossForward(model), device_ids=device_ids,
                                                    find_unused_parameters=True)
    # The Trainer calls model.loss(batch): route it through DDP's forward for this model instance. A plain
    # function, not the Module (which nn.Module.__setattr__ would register as a submodule of the model).
    object.__setattr__(model, "loss", lambda batch: ddp(batch))


def _sync_resumed_state(trainer) -> None:
    """A resumed run: rank 0 restored its checkpoint, the others (scratch directories) did not."""
    epoch = [trainer.state.epoch]
    dist.broadcast_object_list(epoch, src=0)
    if epoch[0] == 0:
        return
    payload = [{"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "state": asdict(trainer.state)} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    if dist.get_rank() != 0:
        trainer.model.load_state_dict(payload[0]["model"])
        trainer.optimizer.load_state_dict(payload[0]["optimizer"])
        trainer.state = type(trainer.state)(**payload[0]["state"])


def _row_slices(batches: Callable[[int], Iterable[dict]], rank: int, world_size: int):
    def sliced(epoch: int) -> Iterator[dict]:
        for batch in batches(epoch):
            rows = _batch_rows(batch)
            if rows < world_size:  # every rank sees the same batch, so all skip it together
                continue
            first, last = rows * rank // world_size, rows * (rank + 1) // world_size
            yield {key: value[first:last] if isinstance(value, torch.Tensor) and value.ndim else value
                   for key, value in batch.items()}
    return sliced


def _batch_rows(batch: dict) -> int:
    sizes = {value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim}
    if len(sizes) != 1:
        raise ConfigError(f"distributed training divides batches by rows, but this batch's tensors have leading "
                          f"sizes {sorted(sizes)}; train this model in one process")
    return sizes.pop()


class _EpochBatches(IterableDataset):
    """One epoch's batches, built in the DataLoader's workers: worker w of n keeps batches w, w+n, ...
    When the batch source takes `part`/`parts`, each worker builds only its own batches; otherwise
    every worker walks the whole epoch and drops the others' (correct, but the building is repeated)."""

    def __init__(self, batches: Callable[..., Iterable[dict]], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        if _takes_parts(self.batches):
            yield from self.batches(self.epoch, part=part, parts=parts)
            return
        for index, batch in enumerate(self.batches(self.epoch)):
            if index % parts == part:
                yield batch


def _takes_parts(batches: Callable) -> bool:
    try:
        parameters = inspect.signature(batches).parameters
    except (TypeError, ValueError):
        return False
    return "part" in parameters and "parts" in parameters


def _in_loader(batches: Callable[[int], Iterable[dict]], workers: int):
    def loaded(epoch: int) -> Iterable[dict]:
        # batch_size=None: the source already yields whole batches; the loader takes one from each worker
        # in turn, so the order is the source's order.
        return DataLoader(_EpochBatches(batches, epoch), batch_size=None, num_workers=workers,
                          persistent_workers=False, prefetch_factor=4,
                          pin_memory=torch.cuda.is_available())
    return loaded
