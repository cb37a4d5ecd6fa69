"""Run-directory helpers, kept here so existing imports work; they live in `hmtrec.rundir`."""

from hmtrec.rundir import (LOGGER_NAME, ArtefactError, RunDir, atomic_write_bytes, close_run_dir,  # noqa: F401
                           get_logger, load_tensors, load_weights, open_run_dir, read_json, save_tensors,
                           save_weights, write_frame, write_json, write_text)
