"""Load a run directory for inference, and recommend after many histories at once.

    artefact = load_sequence_run("runs/quickstart")
    artefact.recommend(["i12", "i907"], k=10)                       # one history
    artefact.recommend_many([["i12", "i907"], ["i3"]], k=10, candidate_fraction=0.05)

Nothing is unpickled: the config is YAML, the taxonomy and item texts JSON, the weights
safetensors. A model is rebuilt from its config entry through the registry, then its weights are
loaded. A non-trainable model whose state is not held in tensors (e.g. neighbour indexes) is
refitted on the training split by `fit_missing` (`hmtrec evaluate` does this). Every file is read
through `hmtrec.rundir`, so a missing or damaged one is a one-line error naming it.

Scores act as logits: a level's probabilities are the softmax of the model's scores for it (over
the scored items: the whole catalogue, or the candidates). A coarser level the model has no head
for gets the probabilities of the finest fully scored level summed under each node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hmtrec.data.sequences import Dataset, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.models.registry import build_model, validate_model_params
from hmtrec.rundir import WEIGHTS_FILE, ArtefactError, RunDir, get_logger, load_weights, read_json
from hmtrec.serve.scoring import HistoryScorer, Scores, pad_histories, scorer_for

MAIN_WEIGHTS = WEIGHTS_FILE
TAXONOMY_FILE = "taxonomy.json"
SCORE_BATCH = 256  # histories scored together


class UnknownItemsError(HmtrecError):
    """A history holds ids the catalogue does not know; `unknown` lists them."""

    def __init__(self, message: str, unknown: list[str], index: int | None):
        self.unknown, self.index = unknown, index
        super().__init__(message)


def read_taxonomy(path: Path) -> Taxonomy:
    data = read_json(path, "the run's catalogue is damaged: retrain into a new run directory")
    try:
        return Taxonomy.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ArtefactError(path, f"not a valid taxonomy ({type(error).__name__}: {error})",
                            "the run's catalogue is damaged: retrain into a new run directory") from None


@dataclass
class SequenceArtefact:
    run_dir: Path
    config: "SequenceConfig"  # noqa: F821 (hmtrec.pipelines.sequence, found through the config registry)
    taxonomy: Taxonomy
    leaf_text: list[str | None] | None
    models: dict[str, torch.nn.Module]            # label -> model, main model first
    needs_fit: list[str] = field(default_factory=list)
    _scorers: dict[str, HistoryScorer] = field(default_factory=dict, repr=False)

    @property
    def main(self) -> str:
        return next(iter(self.models))

    def model(self, label: str | None = None) -> torch.nn.Module:
        label = label or self.main
        if label not in self.models:
            raise ConfigError(f"no model {label!r} in {self.run_dir}; models: {list(self.models)}")
        if label in self.needs_fit:
            raise HmtrecError(f"model {label!r} keeps no saved state; it must be refitted on the training data "
                              f"first (`fit_missing`)")
        return self.models[label]

    def scorer(self, label: str | None = None) -> HistoryScorer:
        label = label or self.main
        if label not in self._scorers:
            self._scorers[label] = scorer_for(self.model(label), self.taxonomy, self.config.eval_max_len)
        return self._scorers[label]

    def check_catalogue(self, taxonomy: Taxonomy) -> None:
        """The data now loaded must have the catalogue the models were trained on."""
        same = (taxonomy.level_names == self.taxonomy.level_names and taxonomy.n_leaves == self.taxonomy.n_leaves
                and np.array_equal(taxonomy.node_labels[-1].astype(str), self.taxonomy.node_labels[-1].astype(str)))
        if not same:
            raise HmtrecError(f"the data loaded now ({taxonomy}) is not the catalogue the run was trained on "
                              f"({self.taxonomy}); did the data files or data settings change?")

    def fit_missing(self, train: SequenceData) -> None:
        for label in self.needs_fit:
            get_logger().info("refitting %s on the training split (its state is not saved as tensors)", label)
            self.models[label].fit(train)
        self.needs_fit = []

    # ---- recommendation ------------------------------------------------------------------------
    def encode_history(self, history: Sequence[str], *, skip_unknown: bool = False,
                       index: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Leaf indices of item labels; unknown labels raise (naming all of them) or are skipped."""
        labels = [str(label) for label in history]
        lookup = self.taxonomy.index_of
        known, unknown = [], []
        try:
            known = [int(i) for i in lookup(labels)]
        except KeyError:  # rare: find which ones, one by one
            for label in labels:
                try:
                    known.append(int(lookup([label])[0]))
                except KeyError:
                    unknown.append(label)
        where = "the history" if index is None else f"history {index}"
        if unknown and not skip_unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UnknownItemsError(f"unknown {self.taxonomy.leaf_level} id(s) in {where}: {shown} "
                                    f"({len(unknown)} of {len(labels)}); pass --skip-unknown to ignore them",
                                    unknown, index)
        if unknown:
            get_logger().warning("skipped %d unknown id(s) in %s: %s", len(unknown), where, unknown[:10])
        return np.asarray(known, dtype=np.int64), unknown

    def recommend(self, history: Sequence[str], k: int = 10, *, label: str | None = None,
                  exclude_history: bool = False, skip_unknown: bool = False, **candidates) -> dict:
        """Top-k leaves (or nodes of the finest level the model predicts) after `history`, each with
        its probability and ancestors, plus the predicted label and probability at every coarser
        level, and whether the top recommendation lies under it. See `recommend_many`."""
        return self.recommend_many([history], k, label=label, exclude_history=exclude_history,
                                   skip_unknown=skip_unknown, **candidates)[0]

    def recommend_many(self, histories: Sequence[Sequence[str]], k: int = 10, *, label: str | None = None,
                       exclude_history: bool = False, skip_unknown: bool = False,
                       candidate_fraction: float | None = None, top_nodes: int | None = None,
                       candidate_level: str | None = None) -> list[dict]:
        """One result per history (oldest event first), scored in batches. Candidates: only the items
        under the model's `top_nodes` best nodes of `candidate_level` (default: the level above the
        items), or under its best nodes up to `candidate_fraction` of the catalogue."""
        if k < 1:
            raise HmtrecError("k must be >= 1")
        if candidate_fraction is not None and top_nodes is not None:
            raise HmtrecError("give candidate_fraction or top_nodes, not both")
        if candidate_fraction is not None and not 0 < candidate_fraction <= 1:
            raise HmtrecError(f"candidate_fraction must be in (0, 1], got {candidate_fraction}")
        if top_nodes is not None and top_nodes < 1:
            raise HmtrecError(f"top_nodes must be >= 1, got {top_nodes}")
        scorer = self.scorer(label)
        use_candidates = candidate_fraction is not None or top_nodes is not None
        if use_candidates:
            self._check_candidate_level(scorer, candidate_level)
        encoded = []
        for index, history in enumerate(histories):
            leaves, skipped = self.encode_history(history, skip_unknown=skip_unknown,
                                                  index=None if len(histories) == 1 else index)
            if len(leaves) == 0:
                where = "the history" if len(histories) == 1 else f"history {index}"
                raise HmtrecError(f"{where} has no known item: nothing to recommend from")
            encoded.append((leaves, skipped))
        results = []
        max_len = self.config.eval_max_len
        for start in range(0, len(encoded), SCORE_BATCH):
            chunk = encoded[start:start + SCORE_BATCH]
            batch = pad_histories([leaves for leaves, _ in chunk], max_len)
            if use_candidates and scorer.supports_candidates:
                scores = scorer.score(batch, level=candidate_level, top=top_nodes, fraction=candidate_fraction)
            else:
                scores = scorer.score(batch)
                if use_candidates:
                    scores = self._mask_candidates(scores, candidate_level, top_nodes, candidate_fraction)
            results += self._results(scores, chunk, histories[start:start + SCORE_BATCH], k, label or self.main,
                                     exclude_history, max_len)
        return results

    def _check_candidate_level(self, scorer: HistoryScorer, level: str | None) -> None:
        levels = self.taxonomy.level_names
        level = level or levels[-2] if len(levels) > 1 else None
        if level is None or level not in levels[:-1]:
            raise HmtrecError(f"candidate_level must be one of {levels[:-1]}, got {level!r}")

    def _mask_candidates(self, scores: Scores, level: str | None, top: int | None,
                         fraction: float | None) -> Scores:
        """Candidates for a model without the split scorer: its full scores, masked outside the items
        under the chosen nodes (the same items; no time saved)."""
        from hmtrec.serve.candidates import candidate_node_mask, leaf_mask_from_nodes

        level = level or self.taxonomy.level_names[-2]
        if scores.finest != self.taxonomy.leaf_level:
            raise HmtrecError("candidates need a model that scores the items")
        node_scores = scores.levels.get(level)
        if node_scores is None:
            probabilities = torch.softmax(scores.levels[scores.finest], dim=1)
            node_scores = _sum_up(probabilities, self.taxonomy, scores.finest, level)
        mode = "fixed_k" if top is not None else "adaptive"
        node_mask = candidate_node_mask(node_scores, self.taxonomy, level, mode=mode, k=top, fraction=fraction)
        keep = leaf_mask_from_nodes(node_mask, self.taxonomy, level)
        leaf_scores = scores.levels[scores.finest].masked_fill(~keep, -float("inf"))
        width = int(keep.sum(1).max())
        top_scores, ids = torch.topk(leaf_scores, width, dim=1)
        ids = torch.where(torch.isfinite(top_scores), ids, torch.full_like(ids, -1))
        levels = {name: value for name, value in scores.levels.items() if name != scores.finest}
        return Scores(levels, scores.finest, top_scores, ids, level, keep.sum(1).float() / self.taxonomy.n_leaves)

    def _labels(self, level: str) -> np.ndarray:
        """The labels of a level's nodes as an array of Python strings (cached: serving reads them often)."""
        cache = self.__dict__.setdefault("_label_cache", {})
        if level not in cache:
            cache[level] = np.asarray([str(label) for label in self.taxonomy.node_labels[
                self.taxonomy.level_index(level)]], dtype=object)
        return cache[level]

    def _ancestor_table(self, level: str) -> np.ndarray:
        """[n_nodes(level), index of level]: each node's ancestor at every coarser level (cached)."""
        cache = self.__dict__.setdefault("_ancestor_cache", {})
        if level not in cache:
            taxonomy = self.taxonomy
            nodes = np.arange(taxonomy.n_nodes(level))
            cache[level] = np.stack([taxonomy.node_ancestors(nodes, level, coarse)
                                     for coarse in taxonomy.level_names[:taxonomy.level_index(level)]], axis=1) \
                if taxonomy.level_index(level) > 0 else np.zeros((len(nodes), 0), dtype=np.int64)
        return cache[level]

    def _results(self, scores: Scores, chunk: list, histories: Sequence, k: int, label: str,
                 exclude_history: bool, max_len: int) -> list[dict]:
        """The answers of one scored batch, built with whole-batch tensor operations."""
        taxonomy = self.taxonomy
        finest = scores.finest
        coarser = taxonomy.level_names[:taxonomy.level_index(finest)]
        n_queries = len(chunk)
        candidates = scores.candidate_scores is not None
        if candidates:
            item_scores, item_ids = scores.candidate_scores.float(), scores.candidate_ids
        else:
            item_scores, item_ids = scores.levels[finest].float(), None
        # a probability is exp(score - logsumexp): no softmax over every scored item is materialised;
        # candidate padding (id -1) already scores -inf, so it ranks last and weighs nothing
        normaliser = torch.logsumexp(item_scores, dim=1, keepdim=True)
        ranked = item_scores
        if exclude_history:
            seen = torch.zeros(n_queries, taxonomy.n_nodes(finest), dtype=torch.bool)
            for row, (leaves, _) in enumerate(chunk):
                nodes = leaves if finest == taxonomy.leaf_level else taxonomy.ancestors(leaves, finest)
                seen[row, torch.from_numpy(np.asarray(nodes, dtype=np.int64))] = True
            ranked = ranked.masked_fill(seen if item_ids is None else seen.gather(1, item_ids.clamp(min=0)),
                                        -float("inf"))
        width = min(k, ranked.shape[1])
        top_values, top = torch.topk(ranked, width, dim=1)
        counts = torch.isfinite(top_values).sum(1).tolist()
        nodes = (top if item_ids is None else item_ids.gather(1, top)).numpy()
        top_probabilities = torch.exp(item_scores.gather(1, top) - normaliser).tolist()
        ids = self._labels(finest)[nodes.clip(min=0)].tolist()
        ancestors = self._ancestor_table(finest)[nodes.clip(min=0)]            # [Q, k, n_coarser]
        ancestor_labels = {level: self._labels(level)[ancestors[:, :, j]].tolist() for j, level in enumerate(coarser)}
        complete = sorted(scores.levels, key=taxonomy.level_index)
        probabilities: dict[str, torch.Tensor] = {}

        def level_probabilities(level: str) -> torch.Tensor:   # softmax of a scored level, when needed
            if level not in probabilities:
                probabilities[level] = torch.softmax(scores.levels[level].float(), dim=1)
            return probabilities[level]

        sources, best = {}, {}
        for level in coarser:
            if level in scores.levels:
                value, index = level_probabilities(level).max(dim=1)
                sources[level] = "head"
            else:
                finer = [name for name in complete if taxonomy.level_index(name) > taxonomy.level_index(level)]
                if not finer:
                    continue
                summed = _sum_up(level_probabilities(finer[-1]), taxonomy, finer[-1], level)
                value, index = summed.max(dim=1)
                sources[level] = f"sum of {finer[-1]} probabilities"
            best[level] = (value.tolist(), self._labels(level)[index.numpy()].tolist())
        results = []
        fractions = scores.candidate_fraction.tolist() if scores.candidate_fraction is not None else None
        for row, (leaves, skipped) in enumerate(chunk):
            n = counts[row]
            # zip over whole rows (no per-item comprehension frame): this loop runs for every answer
            row_ancestors = zip(*(ancestor_labels[level][row][:n] for level in coarser)) if coarser else [()] * n
            recommendations = [{"rank": rank, "id": item, "probability": probability,
                                "ancestors": dict(zip(coarser, above))}
                               for rank, item, probability, above in zip(range(1, n + 1), ids[row][:n],
                                                                         top_probabilities[row][:n], row_ancestors)]
            levels = {level: {"label": best[level][1][row], "probability": best[level][0][row],
                              "source": sources[level],
                              "contains_top": n > 0 and ancestor_labels[level][row][0] == best[level][1][row]}
                      for level in coarser if level in best}
            result = {"model": label, "level": finest, "history": [str(h) for h in histories[row]],
                      "skipped": skipped, "truncated": max(0, len(leaves) - max_len), "levels": levels,
                      "recommendations": recommendations}
            if scores.candidate_scores is not None:
                result["scored"] = {"mode": "candidates", "level": scores.candidate_level,
                                    "fraction": fractions[row]}
            else:
                result["scored"] = {"mode": "full", "fraction": 1.0}
            results.append(result)
        return results


def _sum_up(probabilities: torch.Tensor, taxonomy: Taxonomy, fine: str, coarse: str) -> torch.Tensor:
    """[Q, n_nodes(fine)] -> [Q, n_nodes(coarse)]: each coarse node gets the mass of the fine nodes under it."""
    parent = torch.from_numpy(taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(fine)), fine, coarse))
    out = torch.zeros(probabilities.shape[0], taxonomy.n_nodes(coarse), dtype=torch.float64)
    return out.index_add_(1, parent, probabilities.double()).float()


def build_sequence_model(spec: dict, dataset: Dataset, max_len: int, directory: Path | None):
    """Build the model a spec names, with the context every sequence builder may use."""
    entry, params = validate_model_params("sequence", {k: v for k, v in spec.items() if k != "label"})
    return build_model(entry, params, taxonomy=dataset.taxonomy, dataset=dataset, max_len=max_len,
                       run_dir=directory)


def load_sequence_run(run_dir: str | Path, *, config=None, labels: Sequence[str] | None = None) -> SequenceArtefact:
    """Rebuild the models of a finished sequence run (all, or those in `labels`) with their saved
    weights. `config`: the run's config as the caller already read it (with evaluation overrides)."""
    from hmtrec.lifecycle import open_finished

    if config is None:
        run, _, config = open_finished(run_dir, "sequence", "loading its models")
    else:
        run = RunDir(run_dir)
        run.read_info("sequence")
        run.require_done("loading its models")
    run_dir = run.path
    taxonomy = read_taxonomy(run_dir / TAXONOMY_FILE)
    leaf_text = read_json(run_dir / "leaf_text.json")["text"] if (run_dir / "leaf_text.json").exists() else None
    empty = SequenceData(np.empty(0, np.int64), np.zeros(1, np.int64), np.empty(0, dtype=object))
    source = read_json(run_dir / "data.json").get("source", "run") if (run_dir / "data.json").exists() else "run"
    dataset = Dataset(source, empty, taxonomy, leaf_text)
    specs = config.model_specs()
    if labels is not None:
        unknown = sorted(set(labels) - {spec["label"] for spec in specs})
        if unknown:
            raise ConfigError(f"no model(s) {unknown} in {run_dir}; models: {[s['label'] for s in specs]}")
        specs = [spec for spec in specs if spec["label"] in labels]
    models, needs_fit = {}, []
    for spec in specs:
        directory = run.model_dir(spec["label"], config.model["label"])
        weights = directory / MAIN_WEIGHTS
        if not weights.exists():
            raise ArtefactError(weights, f"is missing: model {spec['label']!r} has not finished training",
                                "rerun `hmtrec train` with the same config and --run-dir to resume")
        model = build_sequence_model(spec, dataset, config.train.max_len, directory)
        state = load_weights(weights)
        if state or len(model.state_dict()) > 0:
            try:
                model.load_state_dict(state)
            except RuntimeError as error:
                raise ArtefactError(weights, f"does not fit model {spec['label']!r} "
                                    f"({str(error).splitlines()[0]})", "retrain into a new run directory") from None
        if not getattr(model, "trainable", True) and not state:
            needs_fit.append(spec["label"])
        model.eval()
        models[spec["label"]] = model
    return SequenceArtefact(run_dir, config, taxonomy, leaf_text, models, needs_fit)


# ---- geo runs ----------------------------------------------------------------------------------

def build_geo_model(config, taxonomy: Taxonomy, event_types: list[str], section: dict | None = None):
    """A geo run's model (or a baseline `section`) for its taxonomy and action types."""
    from hmtrec.data.actions import DEFAULT_EVENT_TYPE

    entry, params = validate_model_params("sequence", section or config.model)
    # builders read the action types from the dataset's log; a stand-in log carries them
    typed = event_types != [DEFAULT_EVENT_TYPE]
    stand_in = SequenceData(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), np.array([]),
                            event_types=np.zeros(0, dtype=np.int64) if typed else None,
                            event_type_names=event_types if typed else [])
    return build_model(entry, params, taxonomy=taxonomy, dataset=Dataset("geo", stand_in, taxonomy))


def load_geo_run(run_dir: str | Path):
    """(config, model with trained weights, taxonomy) of a finished geo run directory."""
    from hmtrec.lifecycle import open_finished

    run, info, config = open_finished(run_dir, "geo", "geo inference")
    taxonomy = read_taxonomy(run.path / TAXONOMY_FILE)
    model = build_geo_model(config, taxonomy, info["event_types"])
    model.load_state_dict(load_weights(run.path / WEIGHTS_FILE))
    model.eval()
    return config, model, taxonomy
