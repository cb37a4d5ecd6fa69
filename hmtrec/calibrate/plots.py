"""PNG plots for calibration and utility-tuning reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hmtrec.calibrate.metrics import reliability_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *,
                        title: str, n_bins: int = 15, strategy: str = "quantile") -> Path:
    """One reliability diagram with a curve per label (e.g. "raw", "isotonic"): observed positive
    rate against mean predicted probability per bin, above a histogram of the predictions.
    Rare events (base rate below 10%) are drawn on log axes so their bins are visible."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_p = np.concatenate([np.asarray(p, dtype=np.float64) for p, _ in curves.values()])
    base_rate = float(np.mean(np.asarray(next(iter(curves.values()))[1], dtype=np.float64)))
    rare = base_rate < 0.1
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    low = max(float(np.quantile(all_p, 0.001)), 1e-4) if rare else 0.0
    top.plot([low if rare else 0, 1], [low if rare else 0, 1], color="grey", linestyle="--", linewidth=1,
             label="perfect")
    for label, (p, y) in curves.items():
        curve = reliability_curve(p, y, n_bins, strategy)
        observed = curve["observed_rate"].to_numpy()
        if rare:
            observed = np.where(observed > 0, observed, np.nan)  # a zero rate has no place on a log axis
        top.plot(curve["mean_predicted"], observed, marker="o", markersize=3, linewidth=1.2, label=label)
        bins = np.geomspace(low, 1.0, 40) if rare else np.linspace(0.0, 1.0, 41)
        bottom.hist(np.clip(p, low, 1.0), bins=bins, histtype="step", linewidth=1.2, label=label)
    if rare:
        top.set_xscale("log")
        top.set_yscale("log")
        bottom.set_xscale("log")
    top.set_ylabel("observed positive rate")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_xlabel(f"predicted probability ({strategy} bins, {n_bins})")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _finish(plt, figure, axis, path: Path, labels: tuple[str, str], title: str) -> Path:
    """Label, grid, legend, save and close: the common end of the line plots."""
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def optimisation_history(histories: dict[str, np.ndarray], path: str | Path, *, title: str,
                         ylabel: str) -> Path:
    """Best objective so far against the trial number, one line per search (e.g. TPE, random).
    Each history is [n_repeats, n_trials] (or [n_trials]); the median and the range are drawn."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, values in histories.items():
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        best = np.fmax.accumulate(values, axis=1)
        trials = np.arange(1, best.shape[1] + 1)
        axis.plot(trials, np.nanmedian(best, axis=0), linewidth=1.5, label=f"{label} (median)")
        if best.shape[0] > 1:
            axis.fill_between(trials, np.nanmin(best, axis=0), np.nanmax(best, axis=0), alpha=0.2)
    return _finish(plt, figure, axis, path, ("trial", f"best {ylabel} so far"), title)


def pareto_plot(all_points: np.ndarray, front: np.ndarray, path: str | Path, *, labels: tuple[str, str],
                title: str) -> Path:
    """Every trial's two objectives, with the Pareto-optimal ones highlighted."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    if len(all_points):
        axis.scatter(all_points[:, 0], all_points[:, 1], s=12, color="lightgrey", label="trials")
    if len(front):
        order = np.argsort(front[:, 0])
        axis.plot(front[order, 0], front[order, 1], marker="o", markersize=4, color="tab:red",
                  label="Pareto front")
    return _finish(plt, figure, axis, path, labels, title)
