"""hmtrec: hierarchical multi-task recommendation.

    import hmtrec
    run = hmtrec.train("configs/quickstart.yaml")          # or hmtrec.load("runs/quickstart-...")
    run.recommend([["i12", "i907"], ["i3"]], k=10)         # many histories at once
    run.evaluate({"eval.candidate_fraction": 0.1})
    hmtrec.load("runs/hinet").predict(rows)                # ranking rows, calibrated when calibrated
"""

__version__ = "0.1.0"

from hmtrec import train  # noqa: E402  (the callable subpackage: hmtrec.train(config) -> Run)
from hmtrec.api import Run, load  # noqa: E402

__all__ = ["Run", "load", "train", "__version__"]
