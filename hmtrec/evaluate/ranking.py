"""Ranking evaluation of sequence models: exact Recall@K, MRR@K and NDCG@K at every taxonomy level,
over the full catalogue and in candidate mode, with breakdowns by segment.

How a run goes:
1. `data` is cut into windows (`make_windows`) and windows are packed into batches whose score
   matrix [M, n_leaves] fits `score_budget_mb`; a window with more targets than fit is split by
   masking its targets, so even a 1M-leaf catalogue is scored a few rows at a time.
2. `model.predict(batch)` gives scores per level at every target position. A level the model has
   no head for is derived from its finest scored level (`aggregate_leaf_scores`: log-sum-exp of
   the leaf logits under each node, or the best leaf with `level_aggregation: max`).
3. Every case's exact rank is computed at every level (`target_ranks`: ties go to the lower index).
   In candidate mode the top nodes of `candidate_level` are chosen from the model's own scores at
   that level; every finer level is ranked among the descendants of the chosen nodes only (a target
   outside is a miss), while levels at or above `candidate_level` are ranked exactly as in full mode.
4. Metrics are means over cases, computed once from all ranks, so how the work was chunked never
   changes a figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, SequenceData, Windows, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.evaluate.metrics import beats_target, metrics_from_ranks, ranks_from_beats
from hmtrec.evaluate.segments import (Segment, check_edges, frequency_segment, history_length_segment,
                                      segment_from_values)
from hmtrec.progress import progress_bar
from hmtrec.serve.candidates import aggregate_node_scores, candidate_node_mask, k_for_fraction

# Bytes of working memory per cell of a [M, n_leaves] score block: the float32 scores, the boolean
# temporaries of the exact rank (higher, tied, beats, allowed) and a float64 aggregation buffer.
BYTES_PER_SCORE_CELL = 16


class EvalSettings(StrictModel):
    """The `eval:` section of a sequence config."""

    ks: list[int] = Field(default_factory=lambda: [10, 20], description="cut-offs K of every metric")
    levels: list[str] | None = Field(None, description="levels to report; default: every level the model "
                                                       "scores and every coarser one")
    level_aggregation: Literal["logsumexp", "max"] = Field(
        "logsumexp", description="how scores of a level without a model head are derived from finer scores")
    candidate_level: str | None = Field(None, description="level whose top nodes define the candidates "
                                                          "(when candidate_k or candidate_fraction turns them "
                                                          "on); default: the level just above the leaves")
    candidate_k: int | None = Field(None, ge=1, description="fixed number of candidate nodes")
    candidate_fraction: float | None = Field(None, gt=0, le=1, description="target share of the catalogue")
    candidate_mode: Literal["fixed_k", "adaptive"] | None = Field(
        None, description="fixed_k: the same k for every query (k given or from the fraction); adaptive: "
                          "per query, nodes until their leaves reach the fraction. Default: fixed_k when "
                          "candidate_k is set, else adaptive")
    max_len: int | None = Field(None, ge=1, description="context length; default: the training max_len")
    batch_size: int = Field(256, ge=1, description="windows per batch (at most)")
    score_budget_mb: float = Field(256.0, gt=0, description="bound on one batch's [cases, leaves] working set")
    segments: list[Literal["history_length", "target_frequency"]] = Field(
        default_factory=lambda: ["history_length", "target_frequency"],
        description="built-in breakdowns; target_frequency needs the training split (evaluate_model's train=)")
    history_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16],
                                       description="lower bounds of the history-length buckets")
    frequency_buckets: list[int] = Field(
        default_factory=lambda: [0, 1, 10, 100],
        description="lower bounds of the buckets of the target item's training occurrences (0: unseen)")
    exclude_history: bool = Field(False, description="rank only leaves absent from the case's own history "
                                  "(every earlier event of its sequence), as RecBole's full-sort evaluation "
                                  "does; the target is always ranked")

    @field_validator("ks")
    @classmethod
    def _check_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(ks))

    @field_validator("history_buckets")
    @classmethod
    def _check_buckets(cls, edges: list[int]) -> list[int]:
        return check_edges(edges, "history_buckets")

    @field_validator("frequency_buckets")
    @classmethod
    def _check_frequency_buckets(cls, edges: list[int]) -> list[int]:
        edges = check_edges(edges, "frequency_buckets")
        if edges[0] < 0:
            raise ValueError(f"frequency_buckets must start at 0 or above, got {edges}")
        return edges

    @model_validator(mode="after")
    def _check_candidates(self) -> "EvalSettings":
        # candidate_level and candidate_mode alone are allowed: they say how candidates are made
        # once turned on, so `candidate_fraction: null` turns candidates off without more edits.
        if self.candidate_k is not None and self.candidate_fraction is not None:
            raise ValueError("set either candidate_k or candidate_fraction, not both (set the other to null)")
        if self.candidate_mode == "adaptive" and self.candidate_k is not None:
            raise ValueError("candidate_mode adaptive takes candidate_fraction, not candidate_k "
                             "(or set candidate_mode: fixed_k)")
        return self

    @property
    def candidate_enabled(self) -> bool:
        return self.candidate_k is not None or self.candidate_fraction is not None

    @property
    def resolved_candidate_mode(self) -> str | None:
        if not self.candidate_enabled:
            return None
        return self.candidate_mode or ("fixed_k" if self.candidate_k is not None else "adaptive")


@dataclass
class CaseRanks:
    """Per-case outcome of an evaluation, cases in event order (`events` ascending)."""

    events: np.ndarray                                   # int64 [n_cases] event index of each target
    full: dict[str, np.ndarray]                          # level -> float64 ranks (exact, 1-based)
    candidate: dict[str, np.ndarray] | None = None       # level -> ranks in candidate mode (inf = miss)
    candidate_sizes: np.ndarray | None = None            # int64 [n_cases] candidate leaves per case
    candidate_covered: np.ndarray | None = None          # bool [n_cases] target leaf among the candidates
    levels: list[str] = field(default_factory=list)      # evaluated levels, coarse to fine
    derived_levels: list[str] = field(default_factory=list)
    candidate_level: str | None = None
    candidate_k: int | None = None
    seconds: float = 0.0

    @property
    def n_cases(self) -> int:
        return len(self.events)


# ---- batching ---------------------------------------------------------------------------------

@dataclass
class _Piece:
    window: int
    first_target: int    # ordinal range of the window's targets scored in this piece
    end_target: int


def _window_target_counts(data: SequenceData, windows: Windows) -> np.ndarray:
    cumulative = np.r_[0, np.cumsum(data.targets())]
    return cumulative[windows.start + windows.length] - cumulative[windows.start + 1]


def plan_batches(target_counts: np.ndarray, window_lengths: np.ndarray, *, max_rows: int,
                 max_windows: int) -> list[list[_Piece]]:
    """Pack windows into batches of at most `max_windows` windows and `max_rows` target rows,
    longest windows first (less padding). A window with more than `max_rows` targets is split into
    pieces that each score a slice of its targets, one piece per batch."""
    order = np.argsort(-window_lengths, kind="stable")
    batches: list[list[_Piece]] = []
    current: list[_Piece] = []
    rows = 0
    for window in order.tolist():
        count = int(target_counts[window])
        if count == 0:
            continue
        if current and (rows + count > max_rows or len(current) == max_windows):
            batches.append(current)
            current, rows = [], 0
        if count <= max_rows:
            current.append(_Piece(window, 0, count))
            rows += count
            continue
        for first in range(0, count, max_rows):
            batches.append([_Piece(window, first, min(count, first + max_rows))])
    if current:
        batches.append(current)
    return batches


def _collate_pieces(data: SequenceData, windows: Windows, pieces: list[_Piece]) -> tuple[dict, np.ndarray]:
    """The batch for `pieces` and the event index of each of its target rows (row-major order)."""
    rows = np.array([piece.window for piece in pieces], dtype=np.int64)
    batch = collate_windows(data, windows, rows)
    targets = batch["targets"]
    is_target = targets != PAD
    first = torch.tensor([piece.first_target for piece in pieces])[:, None]
    end = torch.tensor([piece.end_target for piece in pieces])[:, None]
    ordinal = torch.cumsum(is_target.long(), dim=1) - 1
    keep = is_target & (ordinal >= first) & (ordinal < end)
    if not bool(torch.equal(keep, is_target)):
        batch["targets"] = torch.where(keep, targets, torch.full_like(targets, PAD))
    event_grid = windows.start[rows][:, None] + np.arange(targets.shape[1])[None, :] + 1
    return batch, event_grid[keep.numpy()]


def _without_history(leaf_scores: torch.Tensor, data: SequenceData, target_events: np.ndarray,
                     targets: torch.Tensor) -> torch.Tensor:
    """leaf_scores [M, n_leaves] with -inf at every leaf of each case's earlier events (its whole
    sequence before the target event), the target itself excepted."""
    sequence = np.searchsorted(data.offsets, target_events, side="right") - 1
    begin = data.offsets[sequence]
    counts = target_events - begin
    rows = np.repeat(np.arange(len(target_events)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    items = torch.from_numpy(data.leaves[np.repeat(begin, counts) + within]).to(leaf_scores.device)
    rows = torch.from_numpy(rows).to(leaf_scores.device)
    keep = items != targets[rows]
    leaf_scores = leaf_scores.clone()
    leaf_scores[rows[keep], items[keep]] = -torch.inf
    return leaf_scores


# ---- evaluation ------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    """Where the model's tensors live (parameters, else buffers, as for POP's counts); CPU if none."""
    for attribute in ("parameters", "buffers"):
        tensors = getattr(model, attribute, None)
        if callable(tensors):
            for tensor in tensors():
                return tensor.device
    return torch.device("cpu")


class _LevelPlan:
    """Which levels are evaluated, which are derived and from what, and the node maps used for
    derivation and candidate masks; resolved from the levels of the first batch's predictions."""

    def __init__(self, taxonomy: Taxonomy, settings: EvalSettings, predicted: list[str], device: torch.device):
        unknown = [name for name in predicted if name not in taxonomy.level_names]
        if unknown or not predicted:
            raise ValueError(f"model predicts levels {predicted}; expected names among {taxonomy.level_names}")
        finest = max(taxonomy.level_index(name) for name in predicted)
        self.predicted = list(predicted)
        self.source = taxonomy.level_names[finest]
        available = taxonomy.level_names[: finest + 1]
        if settings.levels is None:
            self.levels = list(available)
        else:
            for name in settings.levels:
                if name not in taxonomy.level_names:
                    raise ValueError(f"eval.levels: unknown level {name!r}; taxonomy levels are "
                                     f"{taxonomy.level_names}")
                if name not in available:
                    raise ValueError(f"eval.levels: level {name!r} is finer than the finest level the model "
                                     f"scores ({self.source!r})")
            self.levels = sorted(set(settings.levels), key=taxonomy.level_index)
        self.candidate_level = None
        if settings.candidate_enabled:
            level = settings.candidate_level or taxonomy.level_names[-2]
            if level not in taxonomy.level_names:
                raise ValueError(f"eval.candidate_level: unknown level {level!r}; taxonomy levels are "
                                 f"{taxonomy.level_names}")
            if taxonomy.level_index(level) >= finest:
                raise ValueError(f"eval.candidate_level {level!r} must be coarser than the finest scored "
                                 f"level {self.source!r}")
            self.candidate_level = level
        needed = set(self.levels) | ({self.candidate_level} if self.candidate_level else set())
        self.derived = [name for name in taxonomy.level_names if name in needed and name not in predicted]
        # node of each evaluated level above every leaf: the targets at that level
        self.target_maps = {name: torch.from_numpy(np.ascontiguousarray(taxonomy.ancestor_table(name))).to(device)
                            for name in needed}

        def to_coarser(fine: str, coarse: str) -> torch.Tensor:
            nodes = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(fine)), fine, coarse)
            return torch.from_numpy(nodes).to(device)

        # node of the derived level above each node of the source level
        self.derive_maps = {name: to_coarser(self.source, name) for name in self.derived}
        # node of the candidate level above each node of every finer evaluated level
        self.candidate_maps: dict[str, torch.Tensor] = {}
        self.candidate_leaf_counts = None
        if self.candidate_level is not None:
            coarse = taxonomy.level_index(self.candidate_level)
            self.candidate_maps = {name: to_coarser(name, self.candidate_level) for name in self.levels
                                   if taxonomy.level_index(name) > coarse}
            self.candidate_leaf_counts = torch.from_numpy(
                taxonomy.leaf_counts(self.candidate_level)).to(device, torch.float64)


def _level_scores(predictions: dict[str, torch.Tensor], plan: _LevelPlan, taxonomy: Taxonomy,
                  settings: EvalSettings, n_rows: int, model_name: str) -> dict[str, torch.Tensor]:
    if sorted(predictions) != sorted(plan.predicted):
        raise ValueError(f"{model_name}.predict returned levels {sorted(predictions)} in one batch and "
                         f"{sorted(plan.predicted)} in another")
    scores = {}
    for name, value in predictions.items():
        expected = (n_rows, taxonomy.n_nodes(name))
        if tuple(value.shape) != expected:
            raise ValueError(f"{model_name}.predict: scores for level {name!r} have shape {tuple(value.shape)}, "
                             f"expected {expected} (one row per target position, one column per node)")
        # a NaN would silently rank as a miss or a hit; summing first keeps the common case cheap
        if torch.isnan(value.sum()) and torch.isnan(value).any():
            raise ValueError(f"{model_name}.predict: scores for level {name!r} contain NaN")
        scores[name] = value
    for name in plan.derived:
        scores[name] = aggregate_node_scores(scores[plan.source], plan.derive_maps[name],
                                             taxonomy.n_nodes(name), settings.level_aggregation)
    return scores


def rank_cases(model, data: SequenceData, taxonomy: Taxonomy, settings: EvalSettings | None = None, *,
               max_len: int | None = None) -> CaseRanks:
    """Exact rank of every target of `data` at every evaluated level, full and (if configured)
    candidate mode. Targets at the first event of a sequence have no context and are skipped."""
    settings = settings or EvalSettings()
    max_len = settings.max_len or max_len
    if max_len is None:
        raise ValueError("evaluation needs a context length: pass max_len or set eval.max_len")
    model_name = type(model).__name__
    if data.n_events and (data.leaves.min() < 0 or data.leaves.max() >= taxonomy.n_leaves):
        bad = int(np.flatnonzero((data.leaves < 0) | (data.leaves >= taxonomy.n_leaves))[0])
        raise ValueError(f"event {bad} has leaf index {int(data.leaves[bad])}, outside the taxonomy's "
                         f"{taxonomy.n_leaves} leaves: the data and the taxonomy do not belong together")
    windows = make_windows(data, max_len)
    max_rows = max(1, int(settings.score_budget_mb * 2**20 // (max(taxonomy.n_leaves, 1) * BYTES_PER_SCORE_CELL)))
    batches = plan_batches(_window_target_counts(data, windows), windows.length, max_rows=max_rows,
                           max_windows=settings.batch_size)
    device = _model_device(model)
    mode = settings.resolved_candidate_mode
    plan: _LevelPlan | None = None
    fixed_k = settings.candidate_k
    events: list[np.ndarray] = []
    full: dict[str, list[torch.Tensor]] = {}
    candidate: dict[str, list[torch.Tensor]] = {}
    sizes: list[torch.Tensor] = []
    covered: list[torch.Tensor] = []

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad(), progress_bar() as bar:
            task = bar.add_task(f"evaluate {model_name}", total=len(batches), info="")
            for pieces in batches:
                batch, batch_events = _collate_pieces(data, windows, pieces)
                batch = {key: value.to(device) for key, value in batch.items()}
                targets = batch["targets"][batch["targets"] != PAD]
                predictions = model.predict(batch)
                if plan is None:
                    plan = _LevelPlan(taxonomy, settings, list(predictions), device)
                    full = {name: [] for name in plan.levels}
                    candidate = {name: [] for name in plan.levels}
                    if mode == "fixed_k" and fixed_k is None:
                        fixed_k = k_for_fraction(taxonomy, plan.candidate_level, settings.candidate_fraction)
                scores = _level_scores(predictions, plan, taxonomy, settings, len(targets), model_name)
                if settings.exclude_history:
                    scores[taxonomy.leaf_level] = _without_history(scores[taxonomy.leaf_level], data,
                                                                   batch_events, targets)
                node_mask = None
                if plan.candidate_level is not None:
                    node_mask = candidate_node_mask(
                        scores[plan.candidate_level], taxonomy, plan.candidate_level, mode=mode,
                        k=fixed_k if mode == "fixed_k" else None,
                        fraction=settings.candidate_fraction if mode == "adaptive" else None,
                        leaf_counts=plan.candidate_leaf_counts)
                    sizes.append((node_mask.to(torch.float64) @ plan.candidate_leaf_counts).round().long().cpu())
                    target_nodes = plan.target_maps[plan.candidate_level][targets]
                    covered.append(node_mask.gather(1, target_nodes[:, None]).squeeze(1).cpu())
                for name in plan.levels:
                    level_targets = plan.target_maps[name][targets]
                    beats = beats_target(scores[name], level_targets)
                    full[name].append(ranks_from_beats(beats, level_targets).cpu())
                    if node_mask is None:
                        continue
                    if name in plan.candidate_maps:
                        # one gather: a node of this level is allowed when its candidate-level ancestor is
                        ancestor = plan.candidate_maps[name].expand(len(targets), -1)
                        allowed = torch.gather(node_mask, 1, ancestor)
                        candidate[name].append(ranks_from_beats(beats, level_targets, allowed).cpu())
                    else:  # at or above the candidate level: ranked as in full mode
                        candidate[name].append(full[name][-1])
                    del beats
                events.append(batch_events)
                bar.advance(task)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    seconds = time.perf_counter() - started
    if plan is None:
        raise ValueError("no evaluation cases: the data has no target with at least one event before it")

    all_events = np.concatenate(events)
    order = np.argsort(all_events, kind="stable")

    def ordered(parts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(parts).numpy()[order]

    result = CaseRanks(events=all_events[order], full={name: ordered(parts) for name, parts in full.items()},
                       levels=plan.levels, derived_levels=[name for name in plan.derived if name in plan.levels],
                       seconds=seconds)
    if plan.candidate_level is not None:
        result.candidate = {name: ordered(parts) for name, parts in candidate.items()}
        result.candidate_sizes = ordered(sizes)
        result.candidate_covered = ordered(covered)
        result.candidate_level = plan.candidate_level
        result.candidate_k = fixed_k if mode == "fixed_k" else None
    return result


def _metrics_by_level(ranks: dict[str, np.ndarray], ks: list[int], select=None) -> dict[str, dict[str, float]]:
    return {name: metrics_from_ranks(torch.from_numpy(values if select is None else values[select]), ks)
            for name, values in ranks.items()}


def summarize(cases: CaseRanks, data: SequenceData, taxonomy: Taxonomy, settings: EvalSettings,
              segments: Mapping[str, Segment | np.ndarray] | None = None,
              train: SequenceData | None = None) -> dict:
    """Metrics (means over cases) from per-case ranks, overall and per segment bucket."""
    ks = settings.ks
    n_cases = cases.n_cases
    result: dict = {
        "n_cases": n_cases,
        "n_skipped": int(data.n_targets - n_cases),
        "seconds": cases.seconds,
        "cases_per_second": n_cases / cases.seconds if cases.seconds > 0 else float("inf"),
        "ks": list(ks),
        "levels": list(cases.levels),
        "derived_levels": list(cases.derived_levels),
        "full": _metrics_by_level(cases.full, ks),
    }
    covered = None
    if cases.candidate is not None:
        covered = cases.candidate_covered
        result["candidate"] = _metrics_by_level(cases.candidate, ks)
        result["candidate_coverage"] = float(covered.mean())
        result["candidate_fraction"] = float((cases.candidate_sizes / taxonomy.n_leaves).mean())
        result["candidate_settings"] = {
            "level": cases.candidate_level, "mode": settings.resolved_candidate_mode,
            "k": cases.candidate_k, "fraction": settings.candidate_fraction}

    all_segments = _resolve_segments(data, settings, segments, train)
    if "target_frequency" in settings.segments and train is None:
        result["segments_unavailable"] = {"target_frequency": "no training split was given to count items in"}
    if all_segments:
        target_events = np.flatnonzero(data.targets())
        case_target = np.searchsorted(target_events, cases.events)
        result["segments"], result["segment_cases"] = {}, {}
        if cases.candidate is not None:
            result["candidate_segments"], result["segment_coverage"] = {}, {}
        for segment in all_segments:
            codes = segment.codes[case_target]
            by_bucket, case_counts, cand_bucket, coverage = {}, {}, {}, {}
            for code, label in enumerate(segment.labels):
                select = codes == code
                count = int(select.sum())
                if count == 0:
                    continue
                case_counts[label] = count
                by_bucket[label] = _metrics_by_level(cases.full, ks, select)
                if cases.candidate is not None:
                    cand_bucket[label] = _metrics_by_level(cases.candidate, ks, select)
                    coverage[label] = float(covered[select].mean())
            result["segments"][segment.name] = by_bucket
            result["segment_cases"][segment.name] = case_counts
            if cases.candidate is not None:
                result["candidate_segments"][segment.name] = cand_bucket
                result["segment_coverage"][segment.name] = coverage
    return result


def _resolve_segments(data: SequenceData, settings: EvalSettings,
                      extra: Mapping[str, Segment | np.ndarray] | None,
                      train: SequenceData | None = None) -> list[Segment]:
    segments = []
    if "history_length" in settings.segments:
        segments.append(history_length_segment(data, settings.history_buckets))
    if "target_frequency" in settings.segments and train is not None:
        segments.append(frequency_segment(train, data, settings.frequency_buckets))
    for name, value in (extra or {}).items():
        segment = value if isinstance(value, Segment) else segment_from_values(name, value, data)
        if len(segment.codes) != data.n_targets:
            raise ValueError(f"segment {name!r}: {len(segment.codes)} codes for {data.n_targets} targets")
        if any(existing.name == segment.name for existing in segments):
            raise ValueError(f"segment name {segment.name!r} is used twice")
        segments.append(segment)
    return segments


def evaluate_model(model, data: SequenceData, taxonomy: Taxonomy, settings: EvalSettings | None = None, *,
                   max_len: int | None = None,
                   segments: Mapping[str, Segment | np.ndarray] | None = None,
                   train: SequenceData | None = None) -> dict:
    """Evaluate `model` on every target of `data`. Returns a JSON-ready dict:
    {"n_cases", "n_skipped", "seconds", "cases_per_second", "ks", "levels", "derived_levels",
     "full": {level: {metric: value}},
     "candidate": {level: {...}}, "candidate_coverage", "candidate_fraction", "candidate_settings"
        (these four only in candidate mode),
     "segments": {segment: {bucket: {level: {...}}}}, "segment_cases": {segment: {bucket: n}},
     "candidate_segments", "segment_coverage" (candidate mode),
     "segments_unavailable": {segment: why} (a configured breakdown that could not be made)}.
    `segments` adds breakdowns: a `Segment`, or one integer per target of `data` (event order).
    `train`: the split the model learnt from, for the `target_frequency` breakdown (how often each
    target item occurs in it)."""
    settings = settings or EvalSettings()
    cases = rank_cases(model, data, taxonomy, settings, max_len=max_len)
    return summarize(cases, data, taxonomy, settings, segments, train)
