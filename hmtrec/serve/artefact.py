"""Load a sequence run directory for inference, and recommend from a history.

    artefact = load_sequence_run("runs/quickstart")
    artefact.recommend(["i12", "i907"], k=10)

Nothing is unpickled: the config is YAML, the taxonomy and item texts JSON, the weights
safetensors. A model is rebuilt from its config entry through the registry, then its weights are
loaded. A non-trainable model whose state is not held in tensors (e.g. neighbour indexes) is
refitted on the training split by `fit_missing` (`hmtrec evaluate` does this).

Scores act as logits: a level's probabilities are the softmax of the model's scores for it. A
coarser level the model has no head for gets the leaf probabilities summed under each node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hmtrec.data.sequences import PAD, Dataset, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.train.run_dir import get_logger, load_weights, read_json


@dataclass
class SequenceArtefact:
    run_dir: Path
    config: "SequenceConfig"  # noqa: F821 (hmtrec.pipelines.sequence)
    taxonomy: Taxonomy
    leaf_text: list[str | None] | None
    models: dict[str, torch.nn.Module]            # label -> model, main model first
    needs_fit: list[str] = field(default_factory=list)

    @property
    def main(self) -> str:
        return next(iter(self.models))

    def model(self, label: str | None = None) -> torch.nn.Module:
        label = label or self.main
        if label not in self.models:
            raise HmtrecError(f"no model {label!r} in {self.run_dir}; models: {list(self.models)}")
        if label in self.needs_fit:
            raise HmtrecError(f"model {label!r} keeps no saved state; it must be refitted on the training data "
                              f"first (`fit_missing`)")
        return self.models[label]

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
    def encode_history(self, history: Sequence[str], *, skip_unknown: bool = False) -> tuple[np.ndarray, list[str]]:
        """Leaf indices of item labels; unknown labels raise (naming all of them) or are skipped."""
        lookup = self.taxonomy.index_of
        known, unknown = [], []
        for label in history:
            try:
                known.append(int(lookup([label])[0]))
            except KeyError:
                unknown.append(str(label))
        if unknown and not skip_unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise HmtrecError(f"unknown {self.taxonomy.leaf_level} id(s) in the history: {shown} "
                              f"({len(unknown)} of {len(history)}); pass --skip-unknown to ignore them")
        if unknown:
            get_logger().warning("skipped %d unknown id(s) in the history: %s", len(unknown), unknown[:10])
        return np.asarray(known, dtype=np.int64), unknown

    def level_probabilities(self, history: Sequence[str], *, label: str | None = None,
                            skip_unknown: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """Probabilities at every level the model reaches, for the next event after `history`.
        Returns ({level: probabilities [n_nodes]}, info: leaf indices of the known ids, the ids
        used (the most recent max_len), skipped ids, truncation, where each level comes from)."""
        model = self.model(label)
        leaves, skipped = self.encode_history(history, skip_unknown=skip_unknown)
        if len(leaves) == 0:
            raise HmtrecError("the history has no known item: nothing to recommend from")
        max_len = self.config.eval_max_len
        truncated = max(0, len(leaves) - max_len)
        known, leaves = leaves, leaves[-max_len:]
        # One query: the last input position is the only target (its value only marks the position).
        batch = {"inputs": torch.from_numpy(leaves)[None, :], "targets": torch.full((1, len(leaves)), PAD)}
        batch["targets"][0, -1] = 0
        model.eval()
        with torch.no_grad():
            scores = {level: value[0].float() for level, value in model.predict(batch).items()}
        probabilities = {level: torch.softmax(value, dim=0) for level, value in scores.items()}
        finest = max(probabilities, key=self.taxonomy.level_index)
        sources = {level: "head" for level in probabilities}
        for level in self.taxonomy.level_names[: self.taxonomy.level_index(finest)]:
            if level not in probabilities:
                parent = self.taxonomy.node_ancestors(np.arange(self.taxonomy.n_nodes(finest)), finest, level)
                mass = torch.zeros(self.taxonomy.n_nodes(level), dtype=torch.float64)
                mass.index_add_(0, torch.from_numpy(parent), probabilities[finest].double())
                probabilities[level] = mass.float()
                sources[level] = f"sum of {finest} probabilities"
        info = {"history": [str(h) for h in history], "known": known, "used": self.taxonomy.labels_of(leaves).tolist(),
                "skipped": skipped, "truncated": truncated, "finest": finest, "sources": sources}
        return probabilities, info

    def recommend(self, history: Sequence[str], k: int = 10, *, label: str | None = None,
                  exclude_history: bool = False, skip_unknown: bool = False) -> dict:
        """Top-k leaves (or nodes of the finest level the model predicts) after `history`, each with
        its probability and ancestors, plus the predicted label and probability at every coarser
        level, and whether the top recommendation lies under it."""
        if k < 1:
            raise HmtrecError("k must be >= 1")
        probabilities, info = self.level_probabilities(history, label=label, skip_unknown=skip_unknown)
        finest = info["finest"]
        scores = probabilities[finest].clone()
        if exclude_history:
            seen = info["known"]
            seen = seen if finest == self.taxonomy.leaf_level else self.taxonomy.ancestors(seen, finest)
            scores[torch.from_numpy(np.unique(seen))] = -1.0
        k = min(k, int((scores >= 0).sum()))
        top = torch.topk(scores, k).indices.numpy()
        finest_index = self.taxonomy.level_index(finest)
        coarser = self.taxonomy.level_names[:finest_index]
        recommendations = []
        for rank, node in enumerate(top, start=1):
            path = {level: str(self.taxonomy.labels_of(
                [self.taxonomy.node_ancestors([node], finest, level)[0]], level)[0]) for level in coarser}
            recommendations.append({"rank": rank, "id": str(self.taxonomy.labels_of([node], finest)[0]),
                                    "probability": float(probabilities[finest][node]), "ancestors": path})
        levels = {}
        for level in coarser:
            best = int(torch.argmax(probabilities[level]))
            top_ancestor = (int(self.taxonomy.node_ancestors([top[0]], finest, level)[0]) if len(top) else None)
            levels[level] = {"label": str(self.taxonomy.labels_of([best], level)[0]),
                             "probability": float(probabilities[level][best]),
                             "source": info["sources"][level],
                             "contains_top": top_ancestor == best}
        return {"model": label or self.main, "level": finest, "history": info["history"],
                "skipped": info["skipped"], "truncated": info["truncated"], "levels": levels,
                "recommendations": recommendations}


def load_sequence_run(run_dir: str | Path, *, config=None, labels: Sequence[str] | None = None) -> SequenceArtefact:
    """Rebuild the models of a sequence run (all, or those in `labels`) with their saved weights."""
    from hmtrec.pipelines.sequence import MAIN_WEIGHTS, build_sequence_model, model_dir, read_run_config

    run_dir = Path(run_dir)
    config = config or read_run_config(run_dir)
    if not (run_dir / "taxonomy.json").exists():
        raise HmtrecError(f"{run_dir} has no taxonomy.json: the run stopped before its data was loaded")
    taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
    leaf_text = read_json(run_dir / "leaf_text.json")["text"] if (run_dir / "leaf_text.json").exists() else None
    empty = SequenceData(np.empty(0, np.int64), np.zeros(1, np.int64), np.empty(0, dtype=object))
    dataset = Dataset(read_json(run_dir / "data.json").get("source", "run") if (run_dir / "data.json").exists()
                      else "run", empty, taxonomy, leaf_text)
    specs = config.model_specs()
    if labels is not None:
        unknown = sorted(set(labels) - {spec["label"] for spec in specs})
        if unknown:
            raise ConfigError(f"no model(s) {unknown} in {run_dir}; models: {[s['label'] for s in specs]}")
        specs = [spec for spec in specs if spec["label"] in labels]
    models, needs_fit = {}, []
    for spec in specs:
        directory = model_dir(run_dir, config, spec["label"])
        weights = directory / MAIN_WEIGHTS
        if not weights.exists():
            raise HmtrecError(f"{weights} is missing: model {spec['label']!r} has not finished training "
                              f"(rerun `hmtrec train` with the same --run-dir to resume)")
        model = build_sequence_model(spec, dataset, config, directory)
        state = load_weights(weights)
        if state or len(model.state_dict()) > 0:
            model.load_state_dict(state)
        if not getattr(model, "trainable", True) and not state:
            needs_fit.append(spec["label"])
        model.eval()
        models[spec["label"]] = model
    return SequenceArtefact(run_dir, config, taxonomy, leaf_text, models, needs_fit)
