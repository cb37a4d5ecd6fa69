"""`hmtrec train`'s run of a pipeline: in one process or as one rank under torchrun, with optional
DataLoader workers and MLflow tracking around it."""

from __future__ import annotations

from pathlib import Path

from hmtrec.train.distributed import rank_run_dir, session, set_loader_workers


def train_run(config, run_dir: Path, *, track: bool = False, tracking_uri: str | None = None,
              experiment: str | None = None, loader_workers: int = 0) -> dict:
    from hmtrec.lifecycle import get_kind

    set_loader_workers(loader_workers)
    device = getattr(getattr(config, "train", None), "device", "cpu")
    pipeline = get_kind(config.kind)
    with session(device) as launch, rank_run_dir(run_dir, launch) as directory:
        if not track:
            return pipeline.train(config, directory)
        from hmtrec.tracking import tracked_run

        with tracked_run(config, directory, tracking_uri=tracking_uri, experiment=experiment):
            return pipeline.train(config, directory)
