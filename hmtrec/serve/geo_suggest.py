"""Region + city suggestions that are consistent by construction (the autosuggest pattern).

Take the top regions by the model's region probability p(r); inside each, the top cities by
p(c | r) = p_city(c) / Σ_{c' in r} p_city(c'); a city's joint probability is p(r) · p(c | r). Every
suggested city lies inside a suggested region, whatever the two heads say. "Region" and "city" are
any two levels of the taxonomy, coarse and fine (e.g. region and cell, or borough and venue).

`GeoSuggester` loads a geo run directory and answers for a user history given as actions with
their ages (days before now).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import HmtrecError


@dataclass
class NestedSuggestions:
    """For Q queries: top coarse nodes [Q, k_coarse] with probabilities, and inside each the top
    fine nodes [Q, k_coarse, k_fine] with joint probabilities (-1 where a coarse node has fewer
    fine nodes than k_fine) and conditional probabilities."""

    coarse: torch.Tensor
    coarse_probability: torch.Tensor
    fine: torch.Tensor
    fine_probability: torch.Tensor
    fine_conditional: torch.Tensor


def nested_suggestions(coarse_log_probs: torch.Tensor, fine_log_probs: torch.Tensor, fine_parent: torch.Tensor,
                       k_coarse: int, k_fine: int) -> NestedSuggestions:
    """coarse_log_probs [Q, n_coarse], fine_log_probs [Q, n_fine], fine_parent [n_fine] (each fine
    node's coarse ancestor). Vectorised over queries; memory Q · k_coarse · n_fine."""
    k_coarse = min(k_coarse, coarse_log_probs.shape[1])
    coarse_probability, coarse = coarse_log_probs.exp().topk(k_coarse, dim=1)            # [Q, kc]
    fine_probability = fine_log_probs.exp()                                                 # [Q, F]
    inside = fine_parent[None, None, :] == coarse[:, :, None]                               # [Q, kc, F]
    masked = torch.where(inside, fine_probability[:, None, :], torch.zeros((), dtype=fine_probability.dtype))
    region_mass = masked.sum(-1, keepdim=True)                                              # [Q, kc, 1]
    k_fine = min(k_fine, fine_log_probs.shape[1])
    # Rank only nodes inside the region: outside ones get -1 so they sort after every inside one.
    ranked = torch.where(inside, masked, torch.full((), -1.0, dtype=masked.dtype))
    top_value, fine = ranked.topk(k_fine, dim=-1)                                           # [Q, kc, kf]
    present = top_value >= 0
    conditional = torch.where(present, top_value / region_mass.clamp_min(1e-30), torch.zeros_like(top_value))
    joint = conditional * coarse_probability[:, :, None]
    fine = torch.where(present, fine, torch.full_like(fine, -1))
    return NestedSuggestions(coarse, coarse_probability, fine, torch.where(present, joint, torch.zeros_like(joint)),
                             conditional)


def suggestions_to_json(taxonomy: Taxonomy, coarse_level: str, fine_level: str, nested: NestedSuggestions,
                        query: int = 0) -> list[dict]:
    """One query's suggestions as [{coarse_level: label, "probability": p, fine_level + "s": [
    {fine_level: label, "probability": joint, "conditional": p(fine | coarse)}]}]."""
    out = []
    for j in range(nested.coarse.shape[1]):
        fines = []
        for m in range(nested.fine.shape[2]):
            node = int(nested.fine[query, j, m])
            if node < 0:
                continue
            fines.append({fine_level: str(taxonomy.labels_of([node], fine_level)[0]),
                          "probability": float(nested.fine_probability[query, j, m]),
                          "conditional": float(nested.fine_conditional[query, j, m])})
        out.append({coarse_level: str(taxonomy.labels_of([int(nested.coarse[query, j])], coarse_level)[0]),
                    "probability": float(nested.coarse_probability[query, j]),
                    f"{fine_level}s": fines})
    return out


class GeoSuggester:
    """A trained geo run, ready to suggest destinations for a history."""

    def __init__(self, run_dir: str | Path):
        from hmtrec.serve.artefact import load_geo_run

        self.run_dir = Path(run_dir)
        self.config, self.model, self.taxonomy = load_geo_run(self.run_dir)
        self.model.eval()

    def suggest(self, venues: Sequence[str], ages_days: Sequence[float], *, types: Sequence[str] | None = None,
                at: str | None = None, k_coarse: int = 3, k_fine: int = 5, coarse_level: str | None = None,
                fine_level: str | None = None, user: str | None = None) -> dict:
        """Suggestions for one user whose history is `venues` (leaf labels) acted on `ages_days`
        days before the prediction time `at` (an ISO date; default now), with action `types`
        (default: the model's first action type). Levels default to the coarsest and finest predicted.
        `user`: the user's id as in the training log, for a model with a user embedding (None: none used)."""
        from hmtrec.data.actions import DAY_SECONDS, DEFAULT_EVENT_TYPE, ActionStreams
        from hmtrec.data.sequences import SequenceData

        if len(venues) != len(ages_days):
            raise HmtrecError(f"{len(venues)} history entries but {len(ages_days)} ages")
        if len(venues) == 0:
            raise HmtrecError("the history is empty: give at least one action")
        ages = np.asarray(ages_days, dtype=np.float64)
        if (ages <= 0).any() or np.isnan(ages).any():
            raise HmtrecError("every action's age must be a positive number of days before the prediction time")
        try:
            leaves = self.taxonomy.index_of([str(v) for v in venues], -1)
        except KeyError as error:
            raise HmtrecError(f"history: {error.args[0]} (not in the trained catalogue)") from None
        type_names = self.model.event_types
        if types is None:
            types = [type_names[0]] * len(venues)
        unknown = sorted(set(types) - set(type_names))
        if unknown:
            raise HmtrecError(f"history: unknown action types {unknown}; the model knows {type_names}")
        settings = self.config.examples
        now = _seconds_since_origin(at, settings.time_origin)
        order = np.argsort(-ages, kind="stable")               # oldest first, as a log is stored
        times = now - ages[order] * DAY_SECONDS
        type_index = np.array([type_names.index(t) for t in types])[order]
        has_types = type_names != [DEFAULT_EVENT_TYPE]
        log = SequenceData(leaves[order], np.array([0, len(order)]), np.array([user or "query"]), timestamps=times,
                           event_types=type_index if has_types else None,
                           event_type_names=type_names if has_types else [])
        batch = ActionStreams(log, settings).query(np.array([0]), np.array([now]))   # no target invented
        if user is None:
            del batch["user_hash"]        # an anonymous history: no user embedding
        with torch.no_grad():
            log_probs = self.model.predict(batch)
        levels = self.model.levels
        coarse_level = coarse_level or levels[0]
        fine_level = fine_level or levels[-1]
        for level in (coarse_level, fine_level):
            if level not in log_probs:
                raise HmtrecError(f"level {level!r} is not predicted by this model ({levels})")
        if self.taxonomy.level_index(coarse_level) >= self.taxonomy.level_index(fine_level):
            raise HmtrecError(f"{coarse_level!r} must be coarser than {fine_level!r}")
        parent = torch.from_numpy(self.taxonomy.node_ancestors(
            np.arange(self.taxonomy.n_nodes(fine_level)), fine_level, coarse_level))
        nested = nested_suggestions(log_probs[coarse_level], log_probs[fine_level], parent, k_coarse, k_fine)
        return {"levels": [coarse_level, fine_level],
                "suggestions": suggestions_to_json(self.taxonomy, coarse_level, fine_level, nested)}


def _seconds_since_origin(at: str | None, time_origin: str | None) -> float:
    import pandas as pd

    moment = pd.Timestamp(at) if at is not None else pd.Timestamp.now(tz="UTC")
    origin = pd.Timestamp(time_origin) if time_origin is not None else pd.Timestamp(0, tz="UTC")
    moment = moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
    origin = origin.tz_localize("UTC") if origin.tzinfo is None else origin.tz_convert("UTC")
    return float((moment - origin).total_seconds())


def parse_history(history: str) -> tuple[list[str], list[float], list[str] | None]:
    """"venue@days[:type] venue@days[:type] ..." -> (venues, ages in days, types or None).
    Entries are separated by spaces or commas; every entry needs its age in days before now."""
    venues, ages, types = [], [], []
    for entry in history.replace(",", " ").split():
        venue, separator, rest = entry.rpartition("@")
        if not separator or not venue:
            raise HmtrecError(f"history entry {entry!r}: write VENUE@DAYS_AGO (optionally VENUE@DAYS_AGO:TYPE)")
        age, _, kind = rest.partition(":")
        try:
            ages.append(float(age))
        except ValueError:
            raise HmtrecError(f"history entry {entry!r}: {age!r} is not a number of days") from None
        venues.append(venue)
        types.append(kind or None)
    if any(t is not None for t in types) and any(t is None for t in types):
        raise HmtrecError("history: give an action type for every entry or for none")
    return venues, ages, None if all(t is None for t in types) else types


def is_geo_run(run_dir: str | Path) -> bool:
    from hmtrec.rundir import read_json

    path = Path(run_dir) / "run.json"
    return path.exists() and read_json(path).get("kind") == "geo"


def suggest_for_run(run_dir: str | Path, history: str, *, k_coarse: int = 3, k_fine: int = 5,
                    at: str | None = None, user: str | None = None) -> dict:
    """What `hmtrec recommend` / `hmtrec suggest` print for a geo run."""
    venues, ages, types = parse_history(history)
    return GeoSuggester(run_dir).suggest(venues, ages, types=types, at=at, k_coarse=k_coarse, k_fine=k_fine,
                                         user=user)
