"""HierSRec: a metadata-aware causal Transformer with hierarchical heads.

Every leaf (item) gets one vector, built from up to three parts that are concatenated and
projected to the model width:
  item-id embedding | one embedding per coarser taxonomy level (its ancestors) | text embedding.
A history is the sequence of its leaves' vectors, encoded by a causal Transformer
(`encoder.CausalTransformer`). At each target position the encoding feeds `HierarchicalHeads`,
one head per chosen level; the leaf head is tied to the same leaf vectors.

Ablation switches: `use_item_ids: false` (metadata only), `use_metadata: false` (ids only),
`head_levels` (e.g. only the leaf level for "no hierarchy", or the coarse levels only to predict
up to a level), `coupling` (parallel or cascade) and `consistency_weight`.

Session-model techniques, each a switch (docs/hiersrec.md has the measured effect of each):
`leaf_scale` (NISER: normalised item and session vectors, logits = scale · cosine),
`readout: attention` (SR-GNN / STAMP last-item + attention readout) with `reversed_positions`
(GCE-GNN), `repeat_explore` (RepeatNet-like repeat-or-explore mixture over the session's own items),
`tied_leaf_head` (input/output weight tying), `item_dropout` (dropout on the leaf-vector table),
`exclude_seen` (history items rank last, for data without repeats).
Hierarchy-to-item switches: `factorized` (p(item) = p(category) · p(item | category)) and
`sibling_smoothing` (a little target mass on the item's siblings); both in `heads.py`.

Large catalogues: `item_loss: sampled` trains the item head with the sampled softmax of
`losses.sample_item_candidates` (the batch's target items plus `uniform_negatives`, log-Q
corrected): a step builds leaf vectors only for its candidates and input items and scores
[M, candidates], never the whole leaf table. With `factorized` the coarse head stays exact and
p(item | category) is the sampled softmax over the candidates under the target's category.
Prediction always scores the whole catalogue.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
import torch.nn.functional as F
from torch import nn

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, Dataset
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender, query_batch, target_positions
from hmtrec.models.sequence.encoder import CausalTransformer
from hmtrec.models.sequence.heads import HierarchicalHeads
from hmtrec.models.sequence.losses import SampledLossParams, sample_item_candidates
from hmtrec.models.sequence.prefixes import target_prefixes
from hmtrec.models.sequence.readout import AttentionReadout, RepeatExplore
from hmtrec.models.sequence.text import build_text_encoder
from hmtrec.rundir import get_logger


class HierSRecParams(SampledLossParams):
    # a saved run's config without one of these keys was trained before the key existed, with the
    # behaviour of this value (not today's default)
    behaviour_before_added: ClassVar[dict[str, Any]] = {"repeat_explore": False}

    dim: int = Field(64, ge=8, description="Transformer width.")
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1, description="Attention heads; must divide dim.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    id_dim: int = Field(64, ge=1, description="Width of the item-id embedding.")
    level_dim: int = Field(32, ge=1, description="Width of each taxonomy-level embedding.")
    text: Literal["hashed", "minilm", "none"] = Field(
        "hashed", description="Item text encoder: hashed bag of words, frozen MiniLM vectors, or none.")
    text_dim: int = Field(32, ge=1, description="Width of the text embedding.")
    text_buckets: int = Field(2**15, ge=1, description="Hash buckets of the bag of words.")
    use_item_ids: bool = Field(True, description="Include the item-id embedding (false: metadata only).")
    use_metadata: bool = Field(True, description="Include taxonomy-level and text embeddings (false: ids only).")
    coupling: Literal["parallel", "cascade"] = "cascade"
    head_levels: list[str] | None = Field(
        None, description="Levels that get a head, coarse to fine; default every level.")
    loss_weights: dict[str, float] = Field(default_factory=dict, description="Per-level loss weight (default 1).")
    consistency_weight: float = Field(0.0, ge=0.0, description="Weight of the KL consistency term (0: off).")
    coarse_weight_final: float | None = Field(
        None, ge=0.0, description="Schedule: coarse heads' loss weights move linearly from loss_weights to this "
                                  "over coarse_weight_steps training steps; null: constant weights.")
    coarse_weight_steps: int = Field(1000, ge=1, description="Length of the coarse-weight schedule, in steps.")
    tied_leaf_head: bool = Field(True, description="Score leaves by dot product with their input vectors.")
    scale_inputs: bool = Field(True, description="Multiply input token vectors by sqrt(dim) (as SASRec "
                                                   "does) so they outweigh the position embeddings.")
    leaf_scale: float | None = Field(
        None, gt=0, description="NISER: unit-length item and session vectors, item logits = leaf_scale x "
                                "cosine (the inverse temperature; the paper uses 12-16); null: plain dot product.")
    readout: Literal["last", "attention"] = Field(
        "last", description="last: the encoding at the last position; attention: SR-GNN/STAMP readout "
                            "[last ; attention summary of the session] projected to dim.")
    reversed_positions: bool = Field(
        False, description="With readout attention: the attention also sees each position's distance from "
                           "the session's end (GCE-GNN's reversed positions).")
    repeat_explore: bool = Field(True, description="RepeatNet-like repeat-or-explore mixture: the item head's "
                                          "distribution mixed with attention over the session's own items.")
    exclude_seen: bool = Field(False, description="Rank the history's own items last (data without repeat "
                                                  "consumption, e.g. ratings); prediction only, like kNN's remind: false.")
    item_dropout: float = Field(0.0, ge=0.0, lt=1.0,
                                description="Dropout on the leaf-vector table (input tokens and, when tied, "
                                            "the output item vectors).")
    factorized: bool = Field(False, description="Item scores through the category: log p(c) + log p(item | c), "
                                                "c the finest coarse head (needs one).")
    sibling_smoothing: float = Field(0.0, ge=0.0, lt=1.0,
                                     description="Share of the item target spread over the item's siblings "
                                                 "(the other items of its parent node).")

    @model_validator(mode="after")
    def _some_input(self):
        if not (self.use_item_ids or self.use_metadata):
            raise ValueError("use_item_ids and use_metadata cannot both be false: items would have no input")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        if self.exclude_seen and self.repeat_explore:
            raise ValueError("exclude_seen needs repeat_explore: false (one ranks the history's items last, the "
                             "other predicts repeats of them)")
        if self.reversed_positions and self.readout != "attention":
            raise ValueError("reversed_positions needs readout: attention (they are part of its attention)")
        return self


class LeafVectors(nn.Module):
    """The [n_leaves, dim] table of leaf vectors: concat(id, ancestor levels, text) -> linear."""

    def __init__(self, taxonomy: Taxonomy, params: HierSRecParams, texts, cache_dir: str | Path | None):
        super().__init__()
        widths = []
        self.item_ids = None
        if params.use_item_ids:
            self.item_ids = nn.Embedding(taxonomy.n_leaves, params.id_dim)
            nn.init.normal_(self.item_ids.weight, std=0.02)
            widths.append(params.id_dim)
        self.levels = nn.ModuleList()
        self.text = None
        if params.use_metadata:
            for level in range(taxonomy.n_levels - 1):
                embedding = nn.Embedding(taxonomy.n_nodes(level), params.level_dim)
                nn.init.normal_(embedding.weight, std=0.02)
                self.levels.append(embedding)
                widths.append(params.level_dim)
            self.text = build_text_encoder(params.text, texts, params.text_dim, buckets=params.text_buckets,
                                           cache_dir=cache_dir)
            if self.text is not None:
                widths.append(params.text_dim)
        self.project = nn.Linear(sum(widths), params.dim)
        self.register_buffer("ancestors", torch.from_numpy(taxonomy.leaf_ancestors[:, :-1].copy()), persistent=False)

    def forward(self) -> torch.Tensor:
        """The whole table. Out of training (eval mode, no autograd) it is kept until a parameter
        changes (its version counter, storage or identity): evaluation asks for it every batch, and
        at a million items rebuilding it cost more than scoring the batch."""
        if self.training or torch.is_grad_enabled():
            self._kept = None
            return self._table()
        key = [(id(p), p._version, p.data_ptr()) for p in self.parameters()]
        kept = getattr(self, "_kept", None)
        if kept is None or kept[0] != key:
            self._kept = kept = (key, self._table())
        return kept[1]

    def _table(self) -> torch.Tensor:
        parts = []
        if self.item_ids is not None:
            parts.append(self.item_ids.weight)
        for level, embedding in enumerate(self.levels):
            parts.append(embedding(self.ancestors[:, level]))
        if self.text is not None:
            parts.append(self.text.table())
        return self.project(torch.cat(parts, dim=1))

    def rows(self, leaves: torch.Tensor) -> torch.Tensor:
        """forward()[leaves] [len(leaves), dim], computed for those leaves only (the text table
        excepted, which its encoders build whole)."""
        parts = []
        if self.item_ids is not None:
            parts.append(self.item_ids(leaves))
        for level, embedding in enumerate(self.levels):
            parts.append(embedding(self.ancestors[leaves, level]))
        if self.text is not None:
            parts.append(self.text.table()[leaves])
        return self.project(torch.cat(parts, dim=1))


class HierSRec(SequenceRecommender):
    def __init__(self, taxonomy: Taxonomy, params: HierSRecParams, *, max_len: int,
                 leaf_text: list[str] | None = None, cache_dir: str | Path | None = None):
        super().__init__(taxonomy)
        self.params = params
        head_levels = params.head_levels or list(taxonomy.level_names)
        unknown = [level for level in head_levels if level not in taxonomy.level_names]
        if unknown:
            raise ConfigError(f"key 'model.head_levels': unknown level(s) {unknown}; "
                              f"the taxonomy's levels are {taxonomy.level_names}")
        head_levels = sorted(set(head_levels), key=taxonomy.level_index)
        unknown = sorted(set(params.loss_weights) - set(head_levels))
        if unknown:
            raise ConfigError(f"key 'model.loss_weights': level(s) {unknown} have no head; heads: {head_levels}")
        if params.use_metadata and params.text != "none" and leaf_text is None:
            get_logger().info("HierSRec: the dataset has no item text; the text embedding is off")
        self.leaf_vectors = LeafVectors(taxonomy, params, leaf_text, cache_dir)
        has_item_head = head_levels[-1] == taxonomy.leaf_level
        if (params.factorized or params.sibling_smoothing or params.leaf_scale or params.exclude_seen) \
                and not has_item_head:
            raise ConfigError("keys 'model.factorized', 'model.sibling_smoothing', 'model.leaf_scale' and "
                              "'model.exclude_seen' act on the item head; model.head_levels has none")
        if params.repeat_explore and not has_item_head:
            get_logger().info("HierSRec: no item head, so no repeat-explore mixture (it acts on items)")
        if params.factorized and len(head_levels) < 2:
            raise ConfigError("key 'model.factorized': needs a coarse head to factorise the item scores "
                              f"through; model.head_levels is {head_levels}")
        if params.item_loss == "sampled" and not has_item_head:
            raise ConfigError("key 'model.item_loss': 'sampled' trains the item head; model.head_levels has none")
        if params.item_loss == "sampled" and (params.sibling_smoothing or params.consistency_weight):
            raise ConfigError("key 'model.item_loss': 'sampled' scores only the sampled items, while "
                              "'model.sibling_smoothing' and 'model.consistency_weight' read the whole item "
                              "distribution; use item_loss: full with them")
        self.encoder = CausalTransformer(params.dim, params.layers, params.heads, params.dropout, max_len)
        self.readout = None
        if params.readout == "attention":
            self.readout = AttentionReadout(params.dim, max_len, params.reversed_positions)
        self.repeat_explore = RepeatExplore(params.dim) if params.repeat_explore and has_item_head else None
        self.item_dropout = nn.Dropout(params.item_dropout)
        self.heads = HierarchicalHeads(taxonomy, head_levels, params.dim, coupling=params.coupling,
                                       loss_weights=params.loss_weights,
                                       consistency_weight=params.consistency_weight,
                                       tied_leaf_head=params.tied_leaf_head, leaf_scale=params.leaf_scale,
                                       factorized=params.factorized,
                                       sibling_smoothing=params.sibling_smoothing,
                                       coarse_weight_final=params.coarse_weight_final,
                                       coarse_weight_steps=params.coarse_weight_steps)

    @property
    def levels(self) -> list[str]:
        return list(self.heads.levels)

    @property
    def sparse_gradients_available(self) -> bool:
        """Whether training can give the item tables sparse gradients (`train.sparse_updates`): under
        `item_loss: sampled` a step reads only its candidates' and inputs' rows of them."""
        return self.params.item_loss == "sampled" and bool(self._sparse_tables())

    def _sparse_tables(self) -> list[nn.Embedding | nn.Linear]:
        tables = [self.leaf_vectors.item_ids] if self.leaf_vectors.item_ids is not None else []
        if not self.heads.tied_leaf_head and self.heads.has_leaf_head:
            tables.append(self.heads.heads[self.taxonomy.leaf_level])
        return tables

    def enable_sparse_gradients(self) -> list[nn.Parameter]:
        """Make the sampled loss read the item-id table (and an untied item head's weights) through
        sparse-gradient lookups; -> those [n_items, *] parameters, for a sparse optimizer. The loss is
        unchanged; only its gradient's layout is."""
        if not self.sparse_gradients_available:
            raise ValueError("HierSRec: sparse gradients need item_loss: sampled and an item-id table or "
                             "untied item head")
        if self.leaf_vectors.item_ids is not None:
            self.leaf_vectors.item_ids.sparse = True
        self.heads.sparse_leaf_head = True
        return [table.weight for table in self._sparse_tables()]

    @property
    def max_len(self) -> int:
        return self.encoder.max_len

    def _encode(self, batch: dict[str, torch.Tensor], leaf_vectors: torch.Tensor, *, last_only: bool = False):
        """-> (session vectors [M, D] at the target positions, hidden [B, T, D], valid [B, T], positions [B, T]).
        `last_only`: the batch is right-padded histories scored after their last event (a query
        batch); without a readout the encoder then computes those positions alone (hidden is None)."""
        inputs = batch["inputs"]
        valid = inputs != PAD
        input_vectors = leaf_vectors if self.params.leaf_scale is None else F.normalize(leaf_vectors, dim=-1)
        tokens = input_vectors[inputs.clamp_min(0)] * valid[..., None]
        if self.params.scale_inputs:
            tokens = tokens * math.sqrt(self.params.dim)
        if last_only and self.readout is None:
            return self.encoder(tokens, valid, last=valid.sum(1) - 1), None, valid, target_positions(batch)
        hidden = self.encoder(tokens, valid)
        at = target_positions(batch)
        # Gather the target positions before any output layer: heads run on [M, D], not [B, T, D].
        session = hidden[at] if self.readout is None else self.readout(hidden, valid, at)
        return session, hidden, valid, at

    def _forward(self, batch: dict[str, torch.Tensor]):
        """-> (head logits at the M target positions, their leaf targets [M], the copy mechanism's
        outputs or None)."""
        leaf_vectors = self.item_dropout(self.leaf_vectors())
        session, hidden, valid, at = self._encode(batch, leaf_vectors)
        copied = None
        if self.repeat_explore is not None:
            copied = self.repeat_explore(hidden, batch["inputs"], valid, at)
        targets = batch["targets"][at] if "targets" in batch else None  # a query batch has none
        return self.heads(session, leaf_vectors), targets, copied

    @property
    def splits_item_scores(self) -> bool:
        """Whether the item scores are the plain item head on `split_query`'s leaf query (a dot
        product with one row per item), so that serving may score candidate items alone."""
        p = self.params
        return (self.heads.levels[-1] == self.taxonomy.leaf_level and self.repeat_explore is None
                and p.leaf_scale is None and not p.factorized and not p.exclude_seen)

    def split_query(self, histories: torch.Tensor, leaf_vectors: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """histories [Q, T] (PAD after each) and the eval-mode leaf vectors -> ({coarse level: logits},
        leaf query [Q, D]): the item head's logits are `leaf query @ item rows.T + bias`."""
        session, _, _, _ = self._encode(query_batch(histories), leaf_vectors, last_only=True)
        coarse, leaf_query = self.heads.coarse_and_leaf_query(session)
        return coarse, leaf_query

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, _, copied = self._forward(batch)
        scores = self.heads.scores(logits)
        if copied is not None:
            explore = self.heads.leaf_log_probabilities(logits)
            scores = {**scores, self.taxonomy.leaf_level: RepeatExplore.log_probabilities(explore, *copied)}
        if self.params.exclude_seen:
            scores = {**scores, self.taxonomy.leaf_level: exclude_history(scores[self.taxonomy.leaf_level], batch)}
        return scores

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.params.item_loss == "sampled":
            logits, targets, copied, leaf_nll = self._sampled_forward(batch)
        else:
            logits, targets, copied = self._forward(batch)
            if copied is None:
                return self.heads.loss(logits, targets)
            leaf_nll = self.heads.leaf_row_nll(logits, targets)
        if copied is not None:
            leaf_nll = RepeatExplore.row_nll(leaf_nll, *copied, targets)
        total, parts = self.heads.loss(logits, targets, leaf_nll=leaf_nll)
        if copied is None:
            return total, parts
        parts["repeat_share"] = float(copied[2][:, 0].detach().exp().mean())
        return total, parts

    def _sampled_forward(self, batch: dict[str, torch.Tensor]):
        """`_forward` for `item_loss: sampled`: leaf vectors of the candidates and the input items
        only. -> (coarse logits, leaf targets [M], the copy mechanism's outputs or None, the item
        head's sampled -log p(target) per row [M])."""
        inputs = batch["inputs"]
        targets = batch["targets"][target_positions(batch)]
        candidates, target_column, log_q = sample_item_candidates(targets, self.taxonomy.n_leaves,
                                                                  self.params.uniform_negatives)
        valid = inputs != PAD
        leaves, local = torch.unique(torch.cat([candidates, inputs[valid]]), return_inverse=True)
        vectors = self.item_dropout(self.leaf_vectors.rows(leaves))
        local_inputs = torch.full_like(inputs, PAD)
        local_inputs[valid] = local[len(candidates):]
        session, hidden, valid, at = self._encode({**batch, "inputs": local_inputs}, vectors)
        copied = None
        if self.repeat_explore is not None:
            copied = self.repeat_explore(hidden, inputs, valid, at)
        logits, leaf_query = self.heads.coarse_and_leaf_query(session)
        leaf_nll = self.heads.sampled_leaf_row_nll(logits, leaf_query, targets, candidates, target_column, log_q,
                                                   vectors[local[:len(candidates)]])
        return logits, targets, copied, leaf_nll


def exclude_history(leaf_scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """leaf_scores [M, n_leaves] with each row's history items (the inputs up to its target
    position) set to -inf, so they rank last."""
    items = target_prefixes(batch).items
    n_leaves = leaf_scores.shape[1]
    # PAD goes to an extra column, so it cannot overwrite a real item's mark at the same index
    seen = torch.zeros(leaf_scores.shape[0], n_leaves + 1, dtype=torch.bool, device=leaf_scores.device)
    seen.scatter_(1, torch.where(items == PAD, n_leaves, items), True)
    return leaf_scores.masked_fill(seen[:, :n_leaves], float("-inf"))


@register_model("sequence", "hiersrec", params=HierSRecParams)
def build_hiersrec(params: HierSRecParams, *, taxonomy: Taxonomy, dataset: Dataset | None = None,
                   max_len: int = 50, run_dir: str | Path | None = None, **context) -> HierSRec:
    """`max_len`: the longest window the model will see; `run_dir`: where MiniLM vectors are cached."""
    return HierSRec(taxonomy, params, max_len=max_len,
                    leaf_text=dataset.leaf_text if dataset is not None else None, cache_dir=run_dir)
