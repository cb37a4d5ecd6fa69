"""The action-token transformer: next-destination prediction at coarse geographic levels.

Each user action is one token whose embedding is a plain sum

    token = Σ_{level in token_levels} E_level[node of the acted-on entity at that level]
            + E_type[action type] + E_age[bucket of the action's age at prediction time]

(e.g. region + cell + venue + "check-in" + "3-5 days ago"). There are no position embeddings: the
age bucket places a token in time. Every stream of an example (long-term, short-term, ...) is
embedded the same way and the streams' tokens are concatenated behind one summary token, whose
embedding is a learned vector plus the embeddings of the prediction time's calendar features
(month, ISO week, weekday). A bidirectional pre-LN Transformer reads the lot; the summary
token's final state feeds `HierarchicalHeads` for the predicted levels only (e.g. region and cell,
no venue head), trained jointly with the optional consistency term.

Optionally (`copy_history: true`, the default) each head's distribution is mixed with a copy distribution
over the example's own actions, as in pointer-generator networks: the summary state attends over
the actions' final states, each action's attention weight goes to its node at the head's level,
and a learned per-level gate g mixes  p = g · softmax(head logits) + (1 - g) · copy. People go
back to places they have been; the pointer lets the model say so without first learning it into
every node's output weights. The mixture's log is returned as the level's logits, so the joint
loss and the consistency term apply to the final distribution.

What else the model may read, each a switch (docs/geo.md has the ablations):
- `copy_recency`: a learned bias per age bucket added to the pointer's attention scores, so the
  pointer can prefer recent actions the way a recency-weighted visit count does;
- `history_counts`: a log-linear pointer: every head's logits get α · log(Σ_actions w(age) · [action
  under node] + δ) added, with learned weights per age bucket w, scale α and pseudo-count δ per
  level. It starts as the recency-weighted visit count (half-life 30 days) of geo-history-pop, so
  the network learns corrections to that reference rather than the reference itself;
- `token_time`: the local hour of day and weekday of every action, embedded into its token;
- `user_buckets`: a user embedding (the user id hashed into that many buckets) added to the summary
  (left out for a batch without `user_hash`, e.g. an anonymous history in serving);
- `distance_bias`: a learned bias by the distance between each candidate node's centre and the
  place of the most recent action (bucketed, and per age bucket of that action), added to the
  final logits of every head; needs the leaves' coordinates (`set_leaf_coordinates`);
- `baseline_prior`: the reference geo-history-pop's log-scores of the example (its own history's
  recency-weighted visits plus training popularity, `history_popularity_log_scores`, the same
  function the reference ranks by) added to every head's logits before the copy mix, times a
  learned scale per level that starts at 1, the heads' weights starting at zero: the network
  starts at the reference and learns a correction to it; needs the training log's node shares
  (`fit_prior`);
- `baseline_mix`: the same reference distribution as a third component of the copy mixture, p =
  w1 · softmax(head) + w2 · copy + w3 · reference with per-level weights a softmax of the summary
  state (in place of the copy gate g);
- `factorized_weight` λ (two heads or more): each finer head's log-score becomes
  (1 - λ) · log_softmax(its own logits) + λ · (log p(parent) + log p(node | parent)), p(node |
  parent) the softmax of its logits over the parent's children only and p(parent) the coarser
  head's final distribution: the coarse head ranks the fine one's parents, so the levels agree
  (λ = 1 makes the consistency term vanish) and the fine head only has to order siblings;
- `reference_blend`: at prediction, p = (1 - w) · the model's distribution + w · geo-history-pop's,
  w per head level and per bucket of the example's number of actions in the last
  `blend_recent_days` (`blend_count_edges`; by default none / some), chosen after training on
  held-out (validation) examples by `geo_post.fit_post_training`; training never sees it (w is 0 until
  then). Unlike `baseline_mix`'s gate, learned on the training examples the heads have fitted
  themselves, the weights come from examples the network has not seen;
- `region_conditioning` (after the blend, fitted with it): the finest level q(c) ∝ p(c) ·
  p(parent(c))^α, α per bucket; with `tied_regions` the coarser levels served are q's marginals.
  `served` is the one place that turns the heads' probabilities into what `predict` returns.

The last encoder layer computes the summary token's row only (the heads read nothing else), which
is exactly that row of the full layer at a fraction of the cost; the pointer's keys are the action
states entering that layer (the token embeddings for a one-layer model).

Batches come from `hmtrec.data.actions.ActionStreams.batch`: per stream `{s}_leaves`, `{s}_types`,
`{s}_age_days` [B, L] and `context_<feature>` [B]. `predict` returns log-probabilities for every
level from the taxonomy's root down to the finest head; a level without a head (e.g. region for a
cell-only model) gets the finest head's probability mass summed up the taxonomy.
"""

from __future__ import annotations

from typing import ClassVar, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from hmtrec.config import StrictModel
from hmtrec.data.actions import CALENDAR_FEATURES, DEFAULT_EVENT_TYPE, log_event_types
from hmtrec.data.geo import KM_PER_DEGREE
from hmtrec.data.sequences import PAD
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.models.families import GEO_ACTIONS
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender
from hmtrec.models.sequence.encoder import Block
from hmtrec.models.sequence.heads import HierarchicalHeads, grouped_log_sum_exp

LEAVES_SUFFIX = "_leaves"


class ActionTransformerParams(StrictModel):
    levels: list[str] | None = None          # head levels, coarse to fine; default: every level above the leaf
    token_levels: list[str] | None = None    # levels summed into a token; default: every level
    dim: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    age_bucket_days: list[float] = Field(default_factory=lambda: [1, 2, 3, 5, 7, 14, 30, 60, 120, 240])
    context: list[Literal["month", "week", "weekday"]] = Field(default_factory=list)
    coupling: Literal["parallel", "cascade"] = "parallel"
    loss_weights: dict[str, float] = Field(default_factory=dict)
    consistency_weight: float = Field(1.0, ge=0)
    copy_history: bool = True                # mix each head with a pointer over the history's actions
    copy_recency: bool = False               # learned per-age-bucket bias on the pointer's attention
    history_counts: bool = False             # add α · log(recency-weighted visit count + δ) to every head
    token_time: bool = False                 # local hour and weekday of each action in its token
    user_buckets: int = Field(0, ge=0)       # hashed user embedding buckets (0: no user embedding)
    distance_bias: bool = False              # bias by distance from the last action's place to each node
    distance_km_edges: list[float] = Field(default_factory=lambda: [0.5, 1, 2, 4, 8, 16])
    baseline_prior: bool = False             # add the geo-history-pop log-scores (learned scale per level)
    baseline_mix: bool = False               # mix geo-history-pop's distribution in beside the copy pointer
    factorized_weight: float = Field(0.0, ge=0, le=1)   # weight of log p(parent) + log p(node | parent)
    # blend the final distribution with geo-history-pop's, one weight per level and recent-activity
    # bucket, fitted on validation after training (`geo_post.fit_post_training`)
    reference_blend: bool = False
    blend_recent_days: float = Field(7.0, gt=0)      # "recent" actions are younger than this at t
    blend_count_edges: list[float] = Field(default_factory=lambda: [1])   # buckets of recent actions (none / some)
    # split every bucket by whether the two most recent actions lie in the same finest-head node
    blend_last_repeat: bool = False
    # after training (and the blend): the finest head's scores times its parent level's probability
    # to the power α, α per recent-activity bucket chosen on validation from `conditioning_alphas`
    # (`hmtrec.models.sequence.geo_post`); with `tied_regions` the coarser levels served are the
    # marginals of those cells, so the levels served agree
    region_conditioning: bool = False
    conditioning_alphas: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
    tied_regions: bool = False
    # the keys fitted after training on held-out examples: changing them needs no retraining
    # (`hmtrec refit`); every other key describes the trained network
    post_training_keys: ClassVar[tuple[str, ...]] = ("reference_blend", "blend_recent_days", "blend_count_edges",
                                                     "blend_last_repeat", "region_conditioning", "conditioning_alphas",
                                                     "tied_regions")

    @field_validator("age_bucket_days", "distance_km_edges", "blend_count_edges")
    @classmethod
    def _increasing(cls, edges: list[float], info) -> list[float]:
        if any(b <= a for a, b in zip(edges, edges[1:])) or any(edge <= 0 for edge in edges):
            raise ValueError(f"{info.field_name} must be positive and strictly increasing")
        return edges

    @field_validator("conditioning_alphas")
    @classmethod
    def _alphas(cls, alphas: list[float]) -> list[float]:
        if not alphas or any(not np.isfinite(a) or a < 0 for a in alphas):
            raise ValueError("conditioning_alphas must be a non-empty list of finite numbers >= 0")
        return sorted(set(alphas))


class ActionTransformer(SequenceRecommender):
    batch_contracts = (GEO_ACTIONS,)

    def __init__(self, taxonomy: Taxonomy, params: ActionTransformerParams, event_types: list[str]):
        super().__init__(taxonomy)
        self.params = params
        self.head_levels = self._resolve_levels(taxonomy, params.levels, "model.levels",
                                                default=taxonomy.level_names[:-1])
        self.token_levels = self._resolve_levels(taxonomy, params.token_levels, "model.token_levels",
                                                 default=taxonomy.level_names)
        self.event_types = list(event_types)
        dim = params.dim

        self.level_embeddings = nn.ModuleDict(
            {level: nn.Embedding(taxonomy.n_nodes(level), dim) for level in self.token_levels})
        self.type_embedding = nn.Embedding(len(self.event_types), dim)
        self.register_buffer("age_edges", torch.tensor(params.age_bucket_days, dtype=torch.float64),
                             persistent=False)
        self.age_embedding = nn.Embedding(len(params.age_bucket_days) + 1, dim)
        self.summary = nn.Parameter(torch.zeros(dim))
        self.context_embeddings = nn.ModuleDict(
            {name: nn.Embedding(CALENDAR_FEATURES[name], dim) for name in params.context})
        embeddings = [*self.level_embeddings.values(), self.type_embedding, self.age_embedding,
                      *self.context_embeddings.values()]
        if params.token_time:
            self.hour_embedding, self.weekday_embedding = nn.Embedding(24, dim), nn.Embedding(7, dim)
            embeddings += [self.hour_embedding, self.weekday_embedding]
        if params.user_buckets:
            self.user_embedding = nn.Embedding(params.user_buckets, dim)
            embeddings.append(self.user_embedding)
        for embedding in embeddings:
            nn.init.normal_(embedding.weight, std=0.02)
        self.input_dropout = nn.Dropout(params.dropout)
        self.blocks = nn.ModuleList(Block(dim, params.n_heads, params.dropout) for _ in range(params.n_layers))
        self.final_norm = nn.LayerNorm(dim)
        unknown = set(params.loss_weights) - set(self.head_levels)
        if unknown:
            raise ConfigError(f"key 'model.loss_weights': levels without a head: {sorted(unknown)}")
        self.heads = HierarchicalHeads(taxonomy, self.head_levels, dim, coupling=params.coupling,
                                       loss_weights=params.loss_weights,
                                       consistency_weight=params.consistency_weight)
        n_age_buckets = len(params.age_bucket_days) + 1
        # recency weight at each age bucket's upper edge for a half-life of 30 days (the reference's)
        recency_edges = torch.tensor([*params.age_bucket_days, 2 * params.age_bucket_days[-1]])
        if params.copy_history:
            self.copy_query = nn.Linear(dim, dim)
            if not params.baseline_mix:      # else the three-way mix_gate below
                self.copy_gate = nn.Linear(dim, len(self.head_levels))
            if params.copy_recency:
                self.copy_age_bias = nn.Parameter(-np.log(2.0) * recency_edges / 30.0)
        if params.history_counts:
            self.count_age_weight = nn.Parameter(-np.log(2.0) * recency_edges / 30.0)   # log w per age bucket
            self.count_scale = nn.Parameter(torch.ones(len(self.head_levels)))
            self.count_log_prior = nn.Parameter(torch.tensor(
                [-np.log(taxonomy.n_nodes(level)) for level in self.head_levels], dtype=torch.float32))
        if params.baseline_mix and not params.copy_history:
            raise ConfigError("key 'model.baseline_mix': mixes the reference in beside the copy pointer, "
                              "which needs model.copy_history: true")
        if self.uses_reference:
            # training popularity per head level, filled by fit_prior; saved with the weights
            for level in self.head_levels:
                n_nodes = taxonomy.n_nodes(level)
                self.register_buffer(self._share_key(level), torch.full((n_nodes,), 1.0 / n_nodes))
        n_buckets = self.n_blend_buckets
        if params.reference_blend:
            # weight of the reference per head level and bucket of recent actions; 0 (the model
            # alone) until the post-training fit sets it; saved with the weights
            self.register_buffer("blend_weights", torch.zeros(len(self.head_levels), n_buckets))
        if params.region_conditioning:
            # α per bucket of recent actions; 0 (no conditioning) until fitted; saved with the weights
            self.register_buffer("conditioning_alpha", torch.zeros(n_buckets))
        elif params.tied_regions:
            raise ConfigError("key 'model.tied_regions': ties the coarser levels to the conditioned cells, "
                              "which needs model.region_conditioning: true")
        if params.reference_blend or params.region_conditioning:
            self.register_buffer("blend_edges", torch.tensor(params.blend_count_edges), persistent=False)
        if params.baseline_mix:
            # per level, softmax over (head, copy, reference) from the summary state
            self.mix_gate = nn.Linear(dim, 3 * len(self.head_levels))
        if params.baseline_prior:
            self.prior_scale = nn.Parameter(torch.ones(len(self.head_levels)))
            for head in self.heads.heads.values():   # silent heads: the model starts at the reference
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        if params.factorized_weight and len(self.head_levels) < 2:
            raise ConfigError("key 'model.factorized_weight': factorised scores need two head levels or more "
                              f"(model.levels is {self.head_levels})")
        if params.distance_bias:
            # filled by set_leaf_coordinates; saved with the weights so a loaded model has them
            self.register_buffer("leaf_coordinates", torch.zeros(taxonomy.n_leaves, 2))
            self.register_buffer("distance_edges", torch.tensor(params.distance_km_edges), persistent=False)
            self.distance_table = nn.Parameter(
                torch.zeros(len(self.head_levels), n_age_buckets, len(params.distance_km_edges) + 1))
        # Each leaf's node at every level (token lookups) and, for levels coarser than the finest
        # head, each finest-head node's ancestor there (to derive levels without a head).
        self.register_buffer("leaf_ancestors", torch.from_numpy(taxonomy.leaf_ancestors.copy()), persistent=False)
        finest = self.head_levels[-1]
        self.output_levels = taxonomy.level_names[: taxonomy.level_index(finest) + 1]
        for level in self.output_levels:
            if level not in self.head_levels:
                parent = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(finest)), finest, level)
                self.register_buffer(f"derived_parent_{level}", torch.from_numpy(parent), persistent=False)
        if params.region_conditioning:
            if len(self.output_levels) < 2:
                raise ConfigError("key 'model.region_conditioning': conditions the finest head on the level above "
                                  f"it, and {finest!r} has none")
            for level in self.output_levels[:-1]:     # each finest node's ancestor at every coarser level
                ancestor = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(finest)), finest, level)
                self.register_buffer(f"finest_ancestor_{level}", torch.from_numpy(ancestor), persistent=False)

    @property
    def n_blend_buckets(self) -> int:
        """Recent-activity buckets of the post-training stage (`recent_activity_buckets`)."""
        return (len(self.params.blend_count_edges) + 1) * (2 if self.params.blend_last_repeat else 1)

    @property
    def uses_reference(self) -> bool:
        """Whether the model reads geo-history-pop's scores (and so needs `fit_prior`)."""
        return self.params.baseline_prior or self.params.baseline_mix or self.params.reference_blend

    @staticmethod
    def _share_key(level: str) -> str:
        return f"prior_share_{level}"

    def fit_prior(self, train) -> None:
        """Node shares of the training log's targets per head level, for `baseline_prior`, `baseline_mix`
        and `reference_blend`."""
        for level, share in popularity_shares(self.taxonomy, train, self.head_levels).items():
            getattr(self, self._share_key(level)).copy_(share)

    @staticmethod
    def _resolve_levels(taxonomy: Taxonomy, levels: list[str] | None, key: str, default: list[str]) -> list[str]:
        levels = list(default if levels is None else levels)
        unknown = [level for level in levels if level not in taxonomy.level_names]
        if unknown or not levels:
            raise ConfigError(f"key {key!r}: unknown or empty levels {unknown or levels}; "
                              f"the taxonomy has {taxonomy.level_names}")
        return sorted(set(levels), key=taxonomy.level_names.index)

    @property
    def levels(self) -> list[str]:
        return list(self.output_levels)

    # ---- encoding --------------------------------------------------------------------------
    def age_buckets(self, age_days: torch.Tensor) -> torch.Tensor:
        """Bucket b holds ages in (edge[b-1], edge[b]]; the last bucket everything older."""
        return torch.bucketize(age_days.to(torch.float64), self.age_edges, right=False)

    def token_embeddings(self, leaves: torch.Tensor, types: torch.Tensor, age_days: torch.Tensor,
                         hours: torch.Tensor | None = None, weekdays: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] actions -> [B, L, D]: Σ level embeddings + type embedding + age-bucket embedding
        (+ hour and weekday embeddings with `token_time`). Values at padding (leaves == PAD) are
        meaningless and masked out of attention.

        The sums are taken over the small tables first (every leaf's Σ of level embeddings, every
        (type, age bucket) pair, every (weekday, hour) pair), so a token costs two or three gathers."""
        n_ages = self.age_embedding.num_embeddings
        place = self.leaf_vectors()[leaves.clamp_min(0)]
        kind_age = (self.type_embedding.weight[:, None] + self.age_embedding.weight[None]).flatten(0, 1)
        tokens = place + kind_age[types.clamp_min(0) * n_ages + self.age_buckets(age_days)]
        if self.params.token_time:
            if hours is None or weekdays is None:
                raise ConfigError("model.token_time needs the actions' hours and weekdays in the batch")
            clock = (self.weekday_embedding.weight[:, None] + self.hour_embedding.weight[None]).flatten(0, 1)
            tokens = tokens + clock[weekdays * 24 + hours]
        return tokens

    def leaf_vectors(self) -> torch.Tensor:
        """[n_leaves, D]: Σ over token levels of each leaf's node embedding at that level."""
        total = None
        for level, embedding in self.level_embeddings.items():
            vectors = embedding.weight[self.leaf_ancestors[:, self.taxonomy.level_index(level)]]
            total = vectors if total is None else total + vectors
        return total

    def summary_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = batch[f"{self.stream_names(batch)[0]}{LEAVES_SUFFIX}"].shape[0]   # a query batch has no targets
        summary = self.summary.expand(size, -1)
        for name, embedding in self.context_embeddings.items():
            summary = summary + embedding(batch[f"context_{name}"])
        if self.params.user_buckets and "user_hash" in batch:      # absent for an anonymous history
            summary = summary + self.user_embedding(batch["user_hash"] % self.params.user_buckets)
        return summary

    def set_leaf_coordinates(self, coordinates: np.ndarray) -> None:
        """(latitude, longitude) of every leaf, [n_leaves, 2], for `distance_bias`."""
        coordinates = torch.as_tensor(np.asarray(coordinates, dtype=np.float32))
        if coordinates.shape != self.leaf_coordinates.shape:
            raise ValueError(f"need [{self.taxonomy.n_leaves}, 2] leaf coordinates, got {tuple(coordinates.shape)}")
        self.leaf_coordinates.copy_(coordinates)

    @staticmethod
    def stream_names(batch: dict[str, torch.Tensor]) -> list[str]:
        return sorted(key[: -len(LEAVES_SUFFIX)] for key in batch if key.endswith(LEAVES_SUFFIX))

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summary state [B, D], the last layer's attention keys of the actions [B, L, D], action
        leaves [B, L] with PAD), the actions of every stream side by side."""
        streams = self.stream_names(batch)
        if not streams or ("targets" in batch and batch["targets"].dim() != 1):
            raise ConfigError("the action-transformer reads action-stream examples (hmtrec.data.actions), "
                              "not sequence windows: train it with a config of kind 'geo'")
        def joined(suffix: str) -> torch.Tensor | None:
            if any(f"{stream}{suffix}" not in batch for stream in streams):
                return None
            return torch.cat([batch[f"{stream}{suffix}"] for stream in streams], 1)

        leaves = joined(LEAVES_SUFFIX)
        actions = self.token_embeddings(leaves, joined("_types"), joined("_age_days"), joined("_hour"),
                                        joined("_weekday"))
        x = torch.cat([self.summary_embedding(batch)[:, None], actions], 1)
        # the summary token's slot is never padding
        valid_keys = torch.cat([torch.ones_like(leaves[:, :1], dtype=torch.bool), leaves != PAD], 1)
        length = x.shape[1]
        # Bidirectional: every token sees every real action (padding keys masked; a query always
        # sees itself, so padded rows never have every key masked).
        h = self.input_dropout(x)
        if len(self.blocks) > 1:
            allowed = valid_keys[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=x.device)[None, None]
            for block in self.blocks[:-1]:
                h = block(h, allowed)
        summary, keys = summary_row(self.blocks[-1], h, valid_keys)
        return self.final_norm(summary), keys[:, 1:], leaves

    # ---- outputs ---------------------------------------------------------------------------
    def logits(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        summary, states, leaves = self.encode(batch)
        logits = self.heads(summary)
        ages = self.action_ages(batch)
        if self.params.baseline_prior:
            logits = self.add_baseline_prior(logits, leaves, ages)
        if self.params.copy_history:
            logits = self.mix_copy(logits, summary, states, leaves, ages)
        if self.params.history_counts:
            logits = self.add_history_counts(logits, leaves, ages)
        if self.params.distance_bias:
            logits = self.add_distance_bias(logits, leaves, ages)
        if self.params.factorized_weight:
            logits = self.factorize(logits)
        return logits

    def add_baseline_prior(self, logits: dict[str, torch.Tensor], leaves: torch.Tensor, ages: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """logits[level] + scale_level · (geo-history-pop's log-score of every node of the level)."""
        prior = self.reference_log_scores(leaves, ages)
        return {level: logits[level] + self.prior_scale[head] * prior[level]
                for head, level in enumerate(self.head_levels)}

    def reference_log_scores(self, leaves: torch.Tensor, ages: torch.Tensor) -> dict[str, torch.Tensor]:
        """geo-history-pop's log-probabilities (its default settings) of every head level's nodes."""
        reference = HistoryPopularityParams()
        shares = {level: getattr(self, self._share_key(level)) for level in self.head_levels}
        return history_popularity_log_scores(self.taxonomy, self.leaf_ancestors, leaves, ages, shares,
                                             reference.prior_weight, reference.half_life_days)

    def factorize(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Coarse to fine: each finer head's logits -> (1 - λ) · log_softmax(logits) + λ · (log p(parent)
        + logits - log Σ exp(logits) over the parent's children), p(parent) from the coarser head's
        (already factorised) output."""
        weight = self.params.factorized_weight
        out = {self.head_levels[0]: logits[self.head_levels[0]]}
        for coarse, fine in zip(self.head_levels, self.head_levels[1:]):
            parent = getattr(self.heads, self.heads._parent_key(fine))
            within = grouped_log_sum_exp(logits[fine], parent, self.taxonomy.n_nodes(coarse))
            factorised = torch.log_softmax(out[coarse], dim=-1)[:, parent] + logits[fine] - within[:, parent]
            out[fine] = factorised if weight == 1 else \
                (1 - weight) * torch.log_softmax(logits[fine], dim=-1) + weight * factorised
        return out

    def action_leaves(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L] leaf of every action (PAD after a stream's last), in the order `encode` lays them out."""
        return torch.cat([batch[f"{stream}{LEAVES_SUFFIX}"] for stream in self.stream_names(batch)], 1)

    def action_ages(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L] age in days of every action, in the order `encode` lays them out."""
        return torch.cat([batch[f"{stream}_age_days"] for stream in self.stream_names(batch)], 1)

    def add_history_counts(self, logits: dict[str, torch.Tensor], leaves: torch.Tensor, ages: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """logits[level] + α_level · log(Σ_actions w[age bucket] · [action under the node] + δ_level)."""
        real = leaves != PAD
        weight = self.count_age_weight[self.age_buckets(ages)].exp() * real                   # [B, L]
        out = {}
        for head, level in enumerate(self.head_levels):
            nodes = self.leaf_ancestors[leaves.clamp_min(0), self.taxonomy.level_index(level)]
            counts = weight.new_zeros(leaves.shape[0], self.taxonomy.n_nodes(level)).scatter_add(1, nodes, weight)
            out[level] = logits[level] + self.count_scale[head] * torch.log(counts + self.count_log_prior[head].exp())
        return out

    def add_distance_bias(self, logits: dict[str, torch.Tensor], leaves: torch.Tensor, ages: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
        """logits[level] + table[level, age bucket of the last action, distance bucket of each node's
        centre from that action's place]."""
        real = leaves != PAD
        last = ages.masked_fill(~real, float("inf")).argmin(1)                       # every example has an action
        last_leaf = leaves.gather(1, last[:, None]).squeeze(1)
        last_place = self.leaf_coordinates[last_leaf]                                # [B, 2]
        last_bucket = self.age_buckets(ages.gather(1, last[:, None]))                # [B, 1]
        km_per_lon_degree = KM_PER_DEGREE * torch.cos(torch.deg2rad(self.leaf_coordinates[:, 0].mean()))
        out = {}
        for head, level in enumerate(self.head_levels):
            centres = self.node_centres(level)                                       # [N, 2]
            dy = (centres[None, :, 0] - last_place[:, None, 0]) * KM_PER_DEGREE
            dx = (centres[None, :, 1] - last_place[:, None, 1]) * km_per_lon_degree
            buckets = torch.bucketize(torch.sqrt(dx * dx + dy * dy), self.distance_edges)   # [B, N]
            out[level] = logits[level] + self.distance_table[head][last_bucket, buckets]
        return out

    def node_centres(self, level: str) -> torch.Tensor:
        """Mean (latitude, longitude) of the leaves under each node of `level`."""
        nodes = self.leaf_ancestors[:, self.taxonomy.level_index(level)]
        n_nodes = self.taxonomy.n_nodes(level)
        total = self.leaf_coordinates.new_zeros(n_nodes, 2).index_add_(0, nodes, self.leaf_coordinates)
        ones = torch.ones_like(nodes, dtype=torch.float32)
        count = self.leaf_coordinates.new_zeros(n_nodes).index_add_(0, nodes, ones)
        return total / count.clamp_min(1)[:, None]

    def mix_copy(self, logits: dict[str, torch.Tensor], summary: torch.Tensor, states: torch.Tensor,
                 leaves: torch.Tensor, ages: torch.Tensor) -> dict[str, torch.Tensor]:
        """log(g · softmax(logits) + (1 - g) · copy) per head level (see the module docstring)."""
        real = leaves != PAD
        scores = (states * self.copy_query(summary)[:, None]).sum(-1) / states.shape[-1] ** 0.5
        if self.params.copy_recency:
            scores = scores + self.copy_age_bias[self.age_buckets(ages)]
        attention = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1).nan_to_num(0.0)  # [B, L]
        if self.params.baseline_mix:
            reference = self.reference_log_scores(leaves, ages)
            weights = torch.softmax(self.mix_gate(summary).view(-1, len(self.head_levels), 3), dim=-1)  # [B, H, 3]
        else:
            gate = torch.sigmoid(self.copy_gate(summary))                                            # [B, H]
        mixed = {}
        for head, level in enumerate(self.head_levels):
            nodes = self.leaf_ancestors[leaves.clamp_min(0), self.taxonomy.level_index(level)]
            copy = attention.new_zeros(leaves.shape[0], self.taxonomy.n_nodes(level)).scatter_add_(1, nodes, attention)
            if self.params.baseline_mix:
                w = weights[:, head]
                probability = w[:, :1] * torch.softmax(logits[level], dim=-1) + w[:, 1:2] * copy + \
                    w[:, 2:] * reference[level].exp()
            else:
                probability = gate[:, head:head + 1] * torch.softmax(logits[level], dim=-1) + \
                    (1 - gate[:, head:head + 1]) * copy
            mixed[level] = probability.clamp_min(1e-12).log()
        return mixed

    def log_probabilities(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Log-probabilities for every output level; levels without a head aggregate the finest head."""
        out = {level: torch.log_softmax(logits[level], dim=-1) for level in self.head_levels}
        finest = torch.softmax(logits[self.head_levels[-1]], dim=-1)
        for level in self.output_levels:
            if level not in out:
                parent = getattr(self, f"derived_parent_{level}")
                mass = finest.new_zeros(finest.shape[0], self.taxonomy.n_nodes(level)).index_add_(1, parent, finest)
                out[level] = mass.clamp_min(1e-30).log()
        return {level: out[level] for level in self.output_levels}

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{level: log-probabilities [B, n_nodes]} for every example of the batch."""
        logits = self.logits(batch)
        blend = self.params.reference_blend and bool(self.blend_weights.any())
        conditioning = self.params.region_conditioning and bool(self.conditioning_alpha.any())
        if not (blend or conditioning):
            return self.log_probabilities(logits)
        leaves, ages = self.action_leaves(batch), self.action_ages(batch)
        bucket = self.recent_activity_buckets(leaves, ages)
        reference = {level: scores.exp() for level, scores in self.reference_log_scores(leaves, ages).items()} \
            if blend else None
        return self.served({level: torch.softmax(logits[level], dim=-1) for level in self.head_levels}, reference,
                           self.blend_weights[:, bucket].T if blend else None,
                           self.conditioning_alpha[bucket] if conditioning else None)

    # ---- after training: the blend and the region conditioning (fitted by geo_post) ----------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The trained network's weights strictly; the post-training buffers may be missing or of
        another shape (a run trained without that switch or with other buckets, or a checkpoint from
        before the refit: they stay at 0, the step off, until fitted) or left over (a switch turned
        off by `hmtrec refit`)."""
        own = self.state_dict()
        post = self.post_training_buffers
        # a post-training buffer of another shape (other activity buckets) is refitted, not loaded
        state = {key: value for key, value in state_dict.items()
                 if key not in post or (key in own and own[key].shape == value.shape)}
        missing = [key for key in post if key in own and key not in state]
        if missing:
            from hmtrec.rundir import get_logger

            get_logger().info("weights without the post-training buffers %s: kept at 0 until fitted", missing)
            state.update({key: own[key] for key in missing})
        return super().load_state_dict(state, strict=strict, assign=assign)

    @property
    def post_training_buffers(self) -> set[str]:
        """State-dict keys fitted after training (or from the training log): a refit may find them
        missing from, or left over in, the trained weights."""
        names = {"blend_weights", "conditioning_alpha"}
        return names | {self._share_key(level) for level in self.head_levels}

    def served(self, model_p: dict[str, torch.Tensor], reference_p: dict[str, torch.Tensor] | None,
               weights: torch.Tensor | None, alpha: torch.Tensor | None, tie: bool | None = None
               ) -> dict[str, torch.Tensor]:
        """The distributions served, from the heads' probabilities `model_p` {head level: [B, n]}:
        per head level p = (1 - w) · model + w · reference (weights [B, n_heads], when given); the
        levels without a head summed from the finest; then, with alpha [B], the finest level q(c) ∝
        p(c) · p(parent(c))^α, and with `tied_regions` (or `tie`, when given) every coarser level the
        marginal of q.
        {output level: log-probabilities [B, n]} (what `predict` returns)."""
        if weights is not None:
            model_p = {level: (1 - weights[:, head, None]) * model_p[level] + weights[:, head, None] * reference_p[level]
                       for head, level in enumerate(self.head_levels)}
        out = self.log_probabilities({level: p.clamp_min(1e-30).log() for level, p in model_p.items()})
        if alpha is None:
            return out
        finest, parent_level = self.output_levels[-1], self.output_levels[-2]
        parent = getattr(self, f"finest_ancestor_{parent_level}")
        conditioned = torch.log_softmax(out[finest] + alpha[:, None] * out[parent_level][:, parent], dim=-1)
        out[finest] = conditioned
        if self.params.tied_regions if tie is None else tie:
            for level in self.output_levels[:-1]:
                out[level] = grouped_log_sum_exp(conditioned, getattr(self, f"finest_ancestor_{level}"),
                                                 self.taxonomy.n_nodes(level))
        return out

    # ---- the validation-fitted blend with the reference -------------------------------------
    def recent_activity_buckets(self, leaves: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """[B] bucket (by `blend_count_edges`) of each example's number of actions (leaves, ages
        [B, L]) younger than `blend_recent_days`: 0 for a dormant example, higher for a busier week."""
        real = leaves != PAD
        recent = (real & (ages < self.params.blend_recent_days)).sum(1)
        bucket = torch.bucketize(recent.to(self.blend_edges.dtype), self.blend_edges, right=True)
        if not self.params.blend_last_repeat:
            return bucket
        # with blend_last_repeat: + n_count_buckets when the two most recent actions share a finest node
        latest = ages.masked_fill(~real, float("inf")).topk(min(2, ages.shape[1]), dim=1, largest=False).indices
        nodes = self.leaf_ancestors[leaves.clamp_min(0), self.taxonomy.level_index(self.head_levels[-1])]
        pair = nodes.gather(1, latest)
        repeat = (real.sum(1) >= 2) & (pair[:, 0] == pair[:, -1])
        return bucket + (len(self.params.blend_count_edges) + 1) * repeat

    @torch.no_grad()
    def post_training_inputs(self, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> dict:
        """What the post-training fit reads of held-out examples ((batch, target leaves [B]) pairs), one
        forward pass each: {"model": {head level: probabilities [N, n]}, "reference": the same of
        geo-history-pop (None without `reference_blend`), "targets": {output level: [N]}, "buckets": [N]}."""
        was_training = self.training
        self.eval()
        parts: dict[str, list] = {"model": [], "reference": [], "targets": [], "buckets": []}
        for batch, target_leaves in batches:
            logits = self.logits(batch)
            leaves, ages = self.action_leaves(batch), self.action_ages(batch)
            parts["model"].append({level: torch.softmax(logits[level], dim=-1) for level in self.head_levels})
            if self.params.reference_blend:
                parts["reference"].append({level: scores.exp()
                                           for level, scores in self.reference_log_scores(leaves, ages).items()})
            parts["targets"].append({level: self.leaf_ancestors[target_leaves, self.taxonomy.level_index(level)]
                                     for level in self.output_levels})
            parts["buckets"].append(self.recent_activity_buckets(leaves, ages))
        self.train(was_training)

        def joined(dicts: list[dict]) -> dict | None:
            return {key: torch.cat([d[key] for d in dicts]) for key in dicts[0]} if dicts else None

        return {"model": joined(parts["model"]), "reference": joined(parts["reference"]),
                "targets": joined(parts["targets"]), "buckets": torch.cat(parts["buckets"])}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.heads.loss(self.logits(batch), batch["targets"])


def summary_row(block: Block, h: torch.Tensor, valid_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 of `block(h, allowed)` alone, [B, D], and the block's attention keys [B, T, D]: the
    summary query attends over every real token (pre-LN, the block's own weights), then the block's
    feed-forward. The same numbers as the full block's first row, without the other T - 1 queries."""
    attention = block.attention
    batch, length, dim = h.shape
    heads = attention.n_heads
    normed = block.norm_attention(h)
    weight, bias = attention.qkv.weight, attention.qkv.bias
    q = F.linear(normed[:, 0], weight[:dim], bias[:dim]).view(batch, 1, heads, dim // heads)
    keys, values = F.linear(normed, weight[dim:], bias[dim:]).split(dim, dim=2)
    scores = (keys.view(batch, length, heads, -1) * q).sum(-1) / (dim // heads) ** 0.5       # [B, T, H]
    weights = torch.softmax(scores.masked_fill(~valid_keys[:, :, None], float("-inf")), dim=1)
    if block.training and attention.attention_dropout:
        weights = F.dropout(weights, attention.attention_dropout)
    y = (weights[..., None] * values.view(batch, length, heads, -1)).sum(1).reshape(batch, dim)
    x = h[:, 0] + attention.residual_dropout(attention.out(y))
    return x + block.feed_forward(block.norm_feed_forward(x)), keys


@register_model("sequence", "action-transformer", params=ActionTransformerParams)
def build_action_transformer(params: ActionTransformerParams, *, taxonomy: Taxonomy, dataset=None, **_) -> ActionTransformer:
    event_types = log_event_types(dataset.sequences) if dataset is not None else [DEFAULT_EVENT_TYPE]
    return ActionTransformer(taxonomy, params, event_types)


class HistoryPopularityParams(StrictModel):
    levels: list[str] | None = None                 # scored levels; default: every level above the leaf
    prior_weight: float = Field(1.0, ge=0)          # pseudo-counts spread by training popularity
    half_life_days: float | None = Field(30.0, gt=0)  # an action's weight halves every this many days; None: 1


class HistoryPopularity(SequenceRecommender):
    """Non-neural reference: a node's score is the (recency-weighted) number of the example's
    actions under it, plus `prior_weight` pseudo-counts spread by the node's share of training
    events. Scores are normalised into log-probabilities, like the transformer's."""

    trainable = False
    batch_contracts = (GEO_ACTIONS,)

    def __init__(self, taxonomy: Taxonomy, params: HistoryPopularityParams):
        super().__init__(taxonomy)
        self.params = params
        self.output_levels = ActionTransformer._resolve_levels(taxonomy, params.levels, "model.levels",
                                                               default=taxonomy.level_names[:-1])
        self.register_buffer("leaf_ancestors", torch.from_numpy(taxonomy.leaf_ancestors.copy()), persistent=False)
        self.shares = {level: torch.full((taxonomy.n_nodes(level),), 1.0 / taxonomy.n_nodes(level))
                       for level in self.output_levels}

    @property
    def levels(self) -> list[str]:
        return list(self.output_levels)

    def fit(self, train) -> None:
        self.shares = popularity_shares(self.taxonomy, train, self.output_levels)

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = torch.cat([batch[f"{s}_leaves"] for s in ActionTransformer.stream_names(batch)], 1)
        ages = torch.cat([batch[f"{s}_age_days"] for s in ActionTransformer.stream_names(batch)], 1)
        return history_popularity_log_scores(self.taxonomy, self.leaf_ancestors, leaves, ages, self.shares,
                                             self.params.prior_weight, self.params.half_life_days)


def popularity_shares(taxonomy: Taxonomy, train, levels: list[str]) -> dict[str, torch.Tensor]:
    """{level: each node's share of the training log's targets [n_nodes]} (float32)."""
    leaves = train.leaves[train.targets()]
    shares = {}
    for level in levels:
        counts = np.bincount(taxonomy.ancestors(leaves, level), minlength=taxonomy.n_nodes(level))
        shares[level] = torch.from_numpy(counts / max(counts.sum(), 1)).float()
    return shares


def history_popularity_log_scores(taxonomy: Taxonomy, leaf_ancestors: torch.Tensor, leaves: torch.Tensor,
                                  ages: torch.Tensor, shares: dict[str, torch.Tensor], prior_weight: float,
                                  half_life_days: float | None) -> dict[str, torch.Tensor]:
    """geo-history-pop's scores: per level of `shares`, log of (Σ over the example's actions of 2^(-age
    / half-life) under each node + prior_weight · the node's training share), normalised to sum 1.
    leaves, ages [B, L] (PAD leaves are no action) -> {level: [B, n_nodes]}."""
    weight = (leaves != PAD).float()
    if half_life_days is not None:
        weight = weight * torch.exp2(-ages.float() / half_life_days)
    out = {}
    for level, share in shares.items():
        nodes = leaf_ancestors[leaves.clamp_min(0), taxonomy.level_index(level)]
        counts = weight.new_zeros(leaves.shape[0], taxonomy.n_nodes(level)).scatter_add_(1, nodes, weight)
        scores = counts + prior_weight * share.to(counts.device)[None]
        out[level] = (scores.clamp_min(1e-30) / scores.sum(1, keepdim=True).clamp_min(1e-30)).log()
    return out


@register_model("sequence", "geo-history-pop", params=HistoryPopularityParams)
def build_history_popularity(params: HistoryPopularityParams, *, taxonomy: Taxonomy, **_) -> HistoryPopularity:
    return HistoryPopularity(taxonomy, params)
