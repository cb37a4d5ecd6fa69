"""Session-based k-nearest neighbours: SKNN and V-SKNN (Jannach & Ludewig, RecSys 2017; Ludewig &
Jannach, UMUAI 2018), evaluated like every other model: a score for every leaf after every prefix.

For the history h of one prediction:
1. Candidate neighbours are the training sequences sharing at least one item with h; of those,
   only the `sample_size` most recent are kept (recency = the sequence's last timestamp, or its
   position in the training data when there are no timestamps), as in the reference.
2. Each candidate n gets a similarity to h:
   - SKNN: cosine `|h ∩ n| / sqrt(|h| |n|)` or Jaccard `|h ∩ n| / |h ∪ n|` on item sets;
   - V-SKNN: `sum_{i in h ∩ n} w(i) / |h|`, where w(i) decays with how long ago i was seen in h
     (`position_weighting`; the default "div" gives the event at 1-based position p of an
     L-event history the weight p / L, so the latest event weighs 1).
3. The `k` most similar candidates vote: `score(i) = sum_n sim(h, n) * [i in n]`. V-SKNN scales
   each vote by `score_weighting(step)`, where step counts back from the end of h to the most
   recent item h shares with n (1 = the last event), so neighbours matched only through old
   events count less.
4. Optionally (`idf_weighting` = λ > 0) scores are multiplied by `1 + λ · idf(i)`, with
   idf(i) = log(n_sequences / sequences containing i).
With `remind: false` the history's own items get no votes and rank last (data without repeat
consumption, such as ratings). Leaves no neighbour contains would all tie at 0; with `popularity_fallback` they are ordered by
training popularity instead, strictly below every neighbour-voted leaf of the same query.
Every coarser taxonomy level is scored too: a node's votes are the summed votes of its leaves,
with the same popularity fallback at that level (votes are not logits, so the evaluator's
log-sum-exp derivation would not suit them).

Everything runs on whole batches: the (query, item, neighbour) triples of a chunk of queries are
expanded with array gathers, reduced with one sort, and the votes are one sparse matrix product.
Chunks are sized by `max_triples` so memory stays bounded on large catalogues.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender
from hmtrec.models.sequence.prefixes import target_prefixes

Decay = Literal["same", "div", "linear", "log", "quadratic"]


class NeighbourParams(StrictModel):
    k: int = Field(100, ge=1, description="Neighbour sequences that vote for items.")
    sample_size: int = Field(
        500, ge=0, description="Only the most recent candidate neighbours are compared (0: all of them).")
    idf_weighting: float = Field(0.0, ge=0.0, description="λ in score * (1 + λ idf(item)); 0 turns it off.")
    popularity_fallback: bool = Field(True, description="Order leaves without votes by training popularity.")
    remind: bool = Field(
        True, description="Items of the history may be recommended again (the reference's default); false: "
                          "they get no votes and rank last (for data without repeats, e.g. ratings).")
    max_triples: int = Field(
        20_000_000, ge=1000, description="Bound on (query, item, neighbour) triples expanded at once (memory).")


class SKNNParams(NeighbourParams):
    similarity: Literal["cosine", "jaccard"] = "cosine"


class VSKNNParams(NeighbourParams):
    idf_weighting: float = Field(1.0, ge=0.0, description="λ in score * (1 + λ idf(item)); 0 turns it off.")
    position_weighting: Decay = Field("div", description="Weight of a history item by its position (latest = 1).")
    score_weighting: Decay = Field(
        "div", description="Vote decay by the step back to the most recent item shared with the neighbour.")


def position_weight(kind: str, position: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Weight of the event at 1-based `position` in a history of `length` events; the last is 1."""
    back = (length - position).astype(np.float64)  # 0 for the latest event
    ratio = position / length
    if kind == "same":
        return np.ones_like(ratio)
    if kind == "div":
        return ratio
    if kind == "linear":
        return np.clip(1.0 - 0.1 * back, 0.0, None)
    if kind == "log":
        return 1.0 / np.log10(back + 1.7)
    if kind == "quadratic":
        return ratio ** 2
    raise ValueError(f"unknown position weighting {kind!r}")


def step_decay(kind: str, step: np.ndarray) -> np.ndarray:
    """Vote weight of a neighbour whose most recent shared item lies `step` events back (1 = last)."""
    step = step.astype(np.float64)
    if kind == "same":
        return np.ones_like(step)
    if kind == "div":
        return 1.0 / step
    if kind == "linear":
        return np.clip(1.0 - 0.1 * step, 0.0, None)
    if kind == "log":
        return 1.0 / np.log10(step + 1.7)
    if kind == "quadratic":
        return 1.0 / step ** 2
    raise ValueError(f"unknown score weighting {kind!r}")


def _concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices start[j] .. start[j] + length[j] - 1 for every j, concatenated."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
    return shifts + np.arange(total)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _rank_within_groups(groups: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal (sorted) group ids."""
    starts = _group_starts(groups)
    lengths = np.diff(np.r_[starts, len(groups)])
    return np.arange(len(groups)) - np.repeat(starts, lengths)


class SessionKNN(SequenceRecommender):
    """SKNN, and V-SKNN when built with VSKNNParams."""

    trainable = False
    _fitted = ("neighbour_items_indptr", "neighbour_items", "item_neighbours_indptr", "item_neighbours",
               "popularity")

    def __init__(self, taxonomy: Taxonomy, params: NeighbourParams):
        super().__init__(taxonomy)
        self.params = params
        self.vector = isinstance(params, VSKNNParams)
        empty = torch.zeros(0, dtype=torch.long)
        # The fitted incidence, as buffers so state_dict / safetensors keep it (no pickles):
        # sequence -> distinct items (CSR, sequences renumbered oldest first) and item -> sequences.
        self.register_buffer("neighbour_items_indptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("neighbour_items", empty.clone())
        self.register_buffer("item_neighbours_indptr", torch.zeros(taxonomy.n_leaves + 1, dtype=torch.long))
        self.register_buffer("item_neighbours", empty.clone())
        self.register_buffer("popularity", torch.zeros(taxonomy.n_leaves))
        self._matrices = None

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, train: SequenceData) -> None:
        n_items = self.taxonomy.n_leaves
        sequence = train.sequence_index()
        last_time = (train.timestamps[train.offsets[1:] - 1] if train.timestamps is not None and train.n_events
                     else np.arange(train.n_sequences, dtype=np.float64))
        nonempty = train.lengths > 0
        # renumber sequences oldest first (ties by original order): a larger index is more recent
        order = np.lexsort((np.arange(train.n_sequences), last_time))
        order = order[nonempty[order]]
        rank = np.full(train.n_sequences, -1, dtype=np.int64)
        rank[order] = np.arange(len(order))
        incidence = sp.csr_matrix((np.ones(train.n_events, dtype=np.float32), (rank[sequence], train.leaves)),
                                  shape=(len(order), n_items))
        incidence.sum_duplicates()
        incidence.data[:] = 1.0
        transposed = incidence.T.tocsr()
        transposed.sort_indices()
        self.neighbour_items_indptr = torch.from_numpy(incidence.indptr.astype(np.int64))
        self.neighbour_items = torch.from_numpy(incidence.indices.astype(np.int64))
        self.item_neighbours_indptr = torch.from_numpy(transposed.indptr.astype(np.int64))
        self.item_neighbours = torch.from_numpy(transposed.indices.astype(np.int64))
        self.popularity = torch.from_numpy(np.bincount(train.leaves, minlength=n_items).astype(np.float32))
        self._matrices = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fitted buffers change size with the training data: adopt the saved ones before loading
        for name in self._fitted:
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].clone())
        self._matrices = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fitted_matrices(self) -> dict:
        if self._matrices is None:
            indptr = self.neighbour_items_indptr.cpu().numpy()
            indices = self.neighbour_items.cpu().numpy()
            n_sequences, n_items = len(indptr) - 1, self.taxonomy.n_leaves
            incidence = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                                      shape=(n_sequences, n_items))
            document_frequency = np.diff(self.item_neighbours_indptr.cpu().numpy())
            idf = np.log(max(n_sequences, 1) / np.maximum(document_frequency, 1)).astype(np.float32)
            popularity = self.popularity.cpu().numpy().astype(np.float64)
            fallback, to_level = {}, {}
            for level in self.levels:
                ancestor = self.taxonomy.ancestor_table(level)
                node_popularity = np.bincount(ancestor, weights=popularity, minlength=self.taxonomy.n_nodes(level))
                # popularity mapped into [0, 1), strictly increasing in the count
                fallback[level] = (node_popularity / (node_popularity.max(initial=0.0) + 1.0)).astype(np.float32)
                to_level[level] = sp.csr_matrix((np.ones(n_items, dtype=np.float32), (np.arange(n_items), ancestor)),
                                                shape=(n_items, self.taxonomy.n_nodes(level)))
            self._matrices = {
                "incidence": incidence,
                "sequence_sizes": np.diff(indptr),
                "item_indptr": self.item_neighbours_indptr.cpu().numpy(),
                "item_neighbours": self.item_neighbours.cpu().numpy(),
                "idf": idf,
                "fallback": fallback,
                "to_level": to_level,
            }
        return self._matrices

    # ---- prediction -------------------------------------------------------------------------
    @property
    def levels(self) -> list[str]:
        return list(self.taxonomy.level_names)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefixes = target_prefixes(batch)
        scores = self.score_histories(prefixes.items.cpu().numpy())
        device = batch["inputs"].device
        return {level: torch.from_numpy(value).to(device) for level, value in scores.items()}

    def score_histories(self, histories: np.ndarray) -> dict[str, np.ndarray]:
        """histories [Q, T] of leaf indices (PAD-padded at the end) -> {level: float32 scores
        [Q, n_nodes(level)]}. A coarser node's votes are the summed votes of its leaves."""
        fitted = self._fitted_matrices()
        n_queries = histories.shape[0]
        query, position = np.nonzero(histories != PAD)  # row-major: per query, positions ascending
        item = histories[query, position]
        length = np.bincount(query, minlength=n_queries)
        # one entry per distinct (query, item), at the item's latest position in the history
        key = query * self.taxonomy.n_leaves + item
        last = len(key) - 1 - np.unique(key[::-1], return_index=True)[1]
        query, item, position = query[last], item[last], position[last] + 1  # 1-based position
        weight = (position_weight(self.params.position_weighting, position, length[query])
                  if self.vector else np.ones(len(item)))
        degree = np.diff(fitted["item_indptr"])[item]
        scores = {level: np.empty((n_queries, self.taxonomy.n_nodes(level)), dtype=np.float32)
                  for level in self.levels}
        # chunk queries so each chunk expands at most max_triples (query, item, neighbour) triples;
        # chunks are contiguous runs of queries
        per_query = np.bincount(query, weights=degree, minlength=n_queries)
        chunk_of_query = (np.cumsum(per_query) - per_query) // self.params.max_triples
        bounds = np.r_[0, np.flatnonzero(np.diff(chunk_of_query)) + 1, n_queries]
        pair_bounds = np.searchsorted(query, bounds)
        for begin, end, pair_begin, pair_end in zip(bounds[:-1], bounds[1:], pair_bounds[:-1], pair_bounds[1:]):
            pairs = slice(pair_begin, pair_end)
            votes = self._votes(query[pairs] - begin, item[pairs], position[pairs], weight[pairs],
                                length[begin:end], fitted)
            if not self.params.remind:  # the history's own items get no votes
                seen = sp.csr_matrix((np.ones(pair_end - pair_begin, dtype=np.float32),
                                      (query[pairs] - begin, item[pairs])), shape=votes.shape)
                votes = votes - votes.multiply(seen)
            votes.eliminate_zeros()
            if self.params.idf_weighting > 0:
                votes.data *= 1.0 + self.params.idf_weighting * fitted["idf"][votes.indices]
            for level in self.levels:
                level_votes = votes if level == self.taxonomy.leaf_level else votes @ fitted["to_level"][level]
                self._write_scores(scores[level][begin:end], level_votes, fitted["fallback"][level])
            if not self.params.remind:  # and rank below every other leaf
                scores[self.taxonomy.leaf_level][query[pairs], item[pairs]] = -1.0
        return scores

    def _votes(self, query, item, position, weight, length, fitted) -> sp.csr_matrix:
        """Leaf votes [n_queries, n_leaves] (sparse) for one chunk; `query` counts from 0 in the chunk."""
        n_queries, n_sequences = len(length), len(fitted["sequence_sizes"])
        indptr = fitted["item_indptr"]
        degree = indptr[item + 1] - indptr[item]
        if degree.sum() == 0:
            return sp.csr_matrix((n_queries, self.taxonomy.n_leaves), dtype=np.float32)
        neighbour = fitted["item_neighbours"][_concatenated_ranges(indptr[item], degree)]
        # reduce triples to one entry per (query, neighbour): shared items, weight sum, latest position
        key = np.repeat(query, degree) * n_sequences + neighbour
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = _group_starts(key)
        shared = np.diff(np.r_[starts, len(key)])
        pair_query, pair_neighbour = key[starts] // n_sequences, key[starts] % n_sequences
        if self.vector:
            weight_sum = np.add.reduceat(np.repeat(weight, degree)[order], starts)
            latest = np.maximum.reduceat(np.repeat(position, degree)[order], starts)
        # sampling: keep each query's sample_size most recent candidates (the largest indices)
        if self.params.sample_size:
            from_end = _rank_within_groups(pair_query[::-1])[::-1]  # neighbours ascend within a query
            keep = from_end < self.params.sample_size
            pair_query, pair_neighbour, shared = pair_query[keep], pair_neighbour[keep], shared[keep]
            if self.vector:
                weight_sum, latest = weight_sum[keep], latest[keep]
        history_size = np.bincount(query, minlength=n_queries)[pair_query]  # distinct items of the history
        if self.vector:
            similarity = weight_sum / history_size
        elif self.params.similarity == "cosine":
            similarity = shared / np.sqrt(history_size * fitted["sequence_sizes"][pair_neighbour])
        else:
            similarity = shared / (history_size + fitted["sequence_sizes"][pair_neighbour] - shared)
        # the k most similar candidates per query; equal similarity: the more recent neighbour first
        best = np.lexsort((-pair_neighbour, -similarity, pair_query))
        best = best[_rank_within_groups(pair_query[best]) < self.params.k]
        pair_query, pair_neighbour, similarity = pair_query[best], pair_neighbour[best], similarity[best]
        if self.vector:
            step = length[pair_query] - latest[best] + 1
            similarity = similarity * step_decay(self.params.score_weighting, step)
        votes = sp.csr_matrix((similarity.astype(np.float32), (pair_query, pair_neighbour)),
                              shape=(n_queries, n_sequences))
        return votes @ fitted["incidence"]

    def _write_scores(self, out: np.ndarray, votes: sp.csr_matrix, fallback: np.ndarray) -> None:
        """Dense scores from sparse votes. Unvoted nodes get 0, or with `popularity_fallback` their
        popularity (`fallback`, in [0, 1)) scaled strictly below the query's smallest positive vote."""
        rows = np.repeat(np.arange(votes.shape[0]), np.diff(votes.indptr))
        if self.params.popularity_fallback:
            smallest = np.full(votes.shape[0], np.inf, dtype=np.float32)
            voted = np.diff(votes.indptr) > 0
            if voted.any():
                smallest[voted] = np.minimum.reduceat(votes.data, votes.indptr[:-1][voted])
            scale = np.where(np.isfinite(smallest), 0.5 * smallest, 1.0).astype(np.float32)
            np.multiply(fallback[None, :], scale[:, None], out=out)
        else:
            out.fill(0.0)
        out[rows, votes.indices] = votes.data


@register_model("sequence", "sknn", params=SKNNParams)
def build_sknn(params: SKNNParams, *, taxonomy: Taxonomy, **_):
    return SessionKNN(taxonomy, params)


@register_model("sequence", "vsknn", params=VSKNNParams)
def build_vsknn(params: VSKNNParams, *, taxonomy: Taxonomy, **_):
    return SessionKNN(taxonomy, params)
