"""Calibration of per-head probabilities, utility blending and Bayesian tuning of utility weights.

Entry points for other code (the ranking pipeline's `predict` calls the first two):
    load_calibration(run_dir) -> Calibration | None     # run_dir / calibration.json
    apply_calibration(frame, calibration) -> frame       # head columns calibrated, raw in <head>_raw
"""

from hmtrec.calibrate.calibration import (Calibration, CalibrationSettings, apply_calibration,
                                          fit_calibration, load_calibration, save_calibration)

__all__ = ["Calibration", "CalibrationSettings", "apply_calibration", "fit_calibration", "load_calibration",
           "save_calibration"]
