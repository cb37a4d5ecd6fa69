"""A synthetic session log with real hierarchical structure, deterministic by seed.

The catalogue is a tree of N >= 2 levels (coarse -> fine -> item). Sessions are random walks on
that tree, so the hierarchy genuinely carries signal:

- popularity skew: items are Zipf-distributed inside their finest category, and categories have
  Zipf-distributed appeal of their own;
- dwell: each step stays in the current finest category with probability `stay`; otherwise it
  climbs the tree (to the parent with probability `sibling`, else further up) and lands on a
  popular item under the node it reached, so sessions wander among a few related categories;
- item-level order: each item has one "next" item in its category (think accessory -> refill);
  with probability `follow_link` a step follows it, which only item-aware models can exploit;
- drift: a session at time t uses the "late" regime with probability t / days, where top-level
  interests are re-ranked and a share of new items (absent early) becomes available and boosted;
- text: each item's text names its categories (with noise), its link group and filler words, so
  metadata helps with cold and rarely seen items.

Everything is vectorised numpy over sessions, generated in chunks: 1M items and 10M events fit in
well under 2 GB. Items are sorted by their tree path internally, so "an item under node x" is a
contiguous range and sampling by popularity is one `searchsorted` on a cumulative weight array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError

SECONDS_PER_DAY = 86_400.0


class SyntheticConfig(StrictModel):
    """Generator settings. The defaults make a catalogue a small hierarchical model trains on in
    about two minutes on two cores and that a hierarchy-aware model beats popularity on clearly."""

    n_items: int = Field(5_000, ge=2)
    level_sizes: list[int] = Field(default_factory=lambda: [20, 200],
                                   description="nodes per non-leaf level, coarse to fine")
    level_names: list[str] | None = Field(None, description="default L1, L2, ..., item")
    n_sessions: int = Field(30_000, ge=1)
    mean_session_length: float = Field(6.0, gt=1.0)
    max_session_length: int = Field(50, ge=2)
    days: float = Field(30.0, gt=0)
    mean_gap_seconds: float = Field(60.0, gt=0)
    item_exponent: float = Field(0.9, ge=0, description="Zipf exponent of items within a category")
    category_exponent: float = Field(0.5, ge=0, description="Zipf exponent of category appeal")
    stay: float = Field(0.55, ge=0, le=1, description="P(next step stays in the finest category)")
    sibling: float = Field(0.7, ge=0, le=1, description="P(a move stops one level up, per level)")
    follow_link: float = Field(0.25, ge=0, le=1, description="P(next item = current item's linked item)")
    new_item_fraction: float = Field(0.1, ge=0, lt=1, description="items that exist only in the late regime")
    new_item_boost: float = Field(3.0, gt=0)
    item_text: bool = True
    text_noise: float = Field(0.1, ge=0, le=1, description="P(a category word in an item's text is wrong)")
    chunk_sessions: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if not self.level_sizes:
            raise ValueError("level_sizes needs at least one non-leaf level")
        sizes = self.level_sizes + [self.n_items]
        if any(b < a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
            raise ValueError(f"level sizes must be >= 1 and non-decreasing down to n_items: {sizes}")
        if self.level_names is not None and len(self.level_names) != len(sizes):
            raise ValueError(f"{len(self.level_names)} level names for {len(sizes)} levels")
        return self

    def names(self) -> list[str]:
        if self.level_names is not None:
            return list(self.level_names)
        return [f"L{i + 1}" for i in range(len(self.level_sizes))] + ["item"]


@dataclass
class SyntheticData:
    """The generated catalogue and log. `events` has columns `sequence` (session id, int64,
    numbered in time order from 1), `item` (leaf index into `taxonomy`, int32) and `time`
    (float64 seconds), sorted by session then time."""

    taxonomy: Taxonomy
    leaf_text: list[str] | None
    events: pd.DataFrame

    def write(self, folder: str | Path, *, format: str = "parquet") -> dict[str, Path]:
        """Write the log and item table in the generic format (see docs/data.md). Times are
        written as epoch seconds from `WRITTEN_EPOCH` (2024-01-01 UTC), so they are plausible
        dates for the generic reader's checks."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        taxonomy = self.taxonomy
        items = {name: taxonomy.labels_of(taxonomy.ancestor_table(level), level)
                 for level, name in enumerate(taxonomy.level_names)}
        items = pd.DataFrame({"item_id": items[taxonomy.leaf_level],
                              **{name: items[name] for name in taxonomy.level_names[:-1]}})
        if self.leaf_text is not None:
            items["text"] = self.leaf_text
        events = pd.DataFrame({"session_id": self.events["sequence"].to_numpy(),
                               "item_id": taxonomy.node_labels[-1][self.events["item"].to_numpy()],
                               "timestamp": self.events["time"].to_numpy() + WRITTEN_EPOCH})
        paths = {"interactions": folder / f"interactions.{format}", "items": folder / f"items.{format}"}
        for frame, path in ((events, paths["interactions"]), (items, paths["items"])):
            if format == "parquet":
                frame.to_parquet(path, index=False)
            elif format == "csv":
                frame.to_csv(path, index=False)
            else:
                raise ConfigError(f"format {format!r}: expected 'parquet' or 'csv'")
        return paths


WRITTEN_EPOCH = 1_704_067_200.0   # 2024-01-01T00:00:00Z: the written log's time origin


def _zipf_weights(ranks: np.ndarray, exponent: float) -> np.ndarray:
    return (ranks.astype(np.float64) + 1.0) ** -exponent


def _assign_parents(n_children: int, n_parents: int, rng: np.random.Generator) -> np.ndarray:
    """Every parent gets at least one child; the rest go to parents with skewed (Dirichlet) odds,
    so node sizes vary as in real catalogues."""
    parents = np.empty(n_children, dtype=np.int64)
    parents[:n_parents] = np.arange(n_parents)
    share = rng.dirichlet(np.full(n_parents, 1.0))
    parents[n_parents:] = rng.choice(n_parents, size=n_children - n_parents, p=share)
    return np.sort(parents)  # children numbered in parent order: subtrees are contiguous ranges


def _rank_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rank 0..size-1 for each element inside its (sorted, contiguous) group."""
    n = len(groups)
    order = np.lexsort((rng.random(n), groups))
    starts = np.searchsorted(groups, groups, side="left")
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n) - starts[order]
    return ranks


_SYLLABLES = np.array(["ka", "lo", "mi", "tu", "ra", "ne", "so", "vi", "de", "pa", "zu", "fe", "go",
                       "hi", "ju", "be", "no", "ri", "sa", "to", "we", "xa", "yo", "qu"])


def _words(count: int, rng: np.random.Generator, syllables: int = 3) -> np.ndarray:
    """`count` distinct pseudo-words (e.g. 'katumi'), deterministic given the generator."""
    n = len(_SYLLABLES)
    codes = rng.choice(n ** syllables, size=count, replace=False) if count <= n ** syllables else \
        np.arange(count)
    parts = []
    for _ in range(syllables):
        parts.append(_SYLLABLES[codes % n])
        codes = codes // n
    words = parts[0].astype(object)
    for part in parts[1:]:
        words = words + part.astype(object)
    if count > n ** syllables:  # more words than syllable combinations: make them unique
        words = words + np.arange(count).astype(str).astype(object)
    return words


class _Catalogue:
    """Internal item order: items sorted by their path, so every node's items are a range."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        sizes = cfg.level_sizes + [cfg.n_items]
        self.n_levels = len(sizes)
        # parents[l][i]: parent of node i of level l, nodes numbered so subtrees are contiguous
        self.parents: list[np.ndarray | None] = [None]
        for level in range(1, self.n_levels):
            self.parents.append(_assign_parents(sizes[level], sizes[level - 1], rng))
        # path[:, l]: each item's node at level l (items in internal order)
        path = np.empty((cfg.n_items, self.n_levels), dtype=np.int64)
        path[:, -1] = np.arange(cfg.n_items)
        for level in range(self.n_levels - 1, 0, -1):
            path[:, level - 1] = self.parents[level][path[:, level]]
        self.path = path
        # range of internal item positions under every node of every level
        self.node_start = [np.searchsorted(path[:, level], np.arange(sizes[level]), side="left")
                           for level in range(self.n_levels)]
        self.node_end = [np.searchsorted(path[:, level], np.arange(sizes[level]), side="right")
                         for level in range(self.n_levels)]
        finest = path[:, -2]
        item_rank = _rank_within(finest, rng)
        item_weight = _zipf_weights(item_rank, cfg.item_exponent)
        category_weight = _zipf_weights(rng.permutation(sizes[-2]), cfg.category_exponent)
        early_top = _zipf_weights(rng.permutation(sizes[0]), cfg.category_exponent)
        late_top = _zipf_weights(rng.permutation(sizes[0]), cfg.category_exponent)
        # new items: never a category's most popular item, so no category is empty early on
        is_new = (rng.random(cfg.n_items) < cfg.new_item_fraction) & (item_rank > 0)
        base = item_weight * category_weight[finest]
        early = np.where(is_new, 0.0, base * early_top[path[:, 0]])
        late = np.where(is_new, base * cfg.new_item_boost, base) * late_top[path[:, 0]]
        self.cumulative = [np.r_[0.0, np.cumsum(w)] for w in (early, late)]
        self.is_new = is_new
        # link: the next item in a random cycle through each finest category
        cycle = np.lexsort((rng.random(cfg.n_items), finest))
        successor = np.empty(cfg.n_items, dtype=np.int64)
        start = self.node_start[-2][finest[cycle]]
        end = self.node_end[-2][finest[cycle]]
        position = np.arange(cfg.n_items)
        following = np.where(position + 1 < end, position + 1, start)
        successor[cycle] = cycle[following]
        self.link = successor
        self.link_group = np.empty(cfg.n_items, dtype=np.int64)
        self.link_group[cycle] = position // 3  # items close in the cycle share a "series" word

    def sample_under(self, nodes: np.ndarray, level: int, regime: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
        """One item under each node (of `level`), by that session's regime popularity."""
        out = np.empty(len(nodes), dtype=np.int64)
        for r, cumulative in enumerate(self.cumulative):
            rows = np.flatnonzero(regime == r)
            if not len(rows):
                continue
            lo = cumulative[self.node_start[level][nodes[rows]]]
            hi = cumulative[self.node_end[level][nodes[rows]]]
            target = lo + rng.random(len(rows)) * (hi - lo)
            picked = np.searchsorted(cumulative, target, side="right") - 1
            start = self.node_start[level][nodes[rows]]
            end = self.node_end[level][nodes[rows]]
            out[rows] = np.clip(picked, start, end - 1)
        return out


def _climb_probabilities(cfg: SyntheticConfig, n_levels: int) -> np.ndarray:
    """P(a step lands under the current item's ancestor that is d levels above the leaf),
    d = 1 (same finest category) .. n_levels - 1 (the top level), plus the whole catalogue."""
    climbs = n_levels - 1  # number of ancestors above the item
    probabilities = np.zeros(climbs + 1)
    probabilities[0] = cfg.stay
    remaining = 1.0 - cfg.stay
    for d in range(1, climbs):
        probabilities[d] = remaining * cfg.sibling
        remaining -= probabilities[d]
    probabilities[climbs] = remaining  # jump anywhere (by the regime's global popularity)
    return probabilities


def generate(cfg: SyntheticConfig | None = None, seed: int = 0) -> SyntheticData:
    """Generate the catalogue and the session log. Same config and seed -> identical output."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(seed)
    catalogue = _Catalogue(cfg, rng)
    n_levels = catalogue.n_levels
    climb = np.cumsum(_climb_probabilities(cfg, n_levels))

    # Session lengths (geometric, heavy-tailed) and start times (sorted: ids follow time).
    p = 1.0 / (cfg.mean_session_length - 1.0)
    lengths = np.minimum(1 + rng.geometric(min(p, 1.0), size=cfg.n_sessions), cfg.max_session_length)
    starts = np.sort(rng.random(cfg.n_sessions)) * cfg.days * SECONDS_PER_DAY
    offsets = np.r_[0, np.cumsum(lengths)]
    n_events = int(offsets[-1])
    items = np.empty(n_events, dtype=np.int32)
    times = np.empty(n_events, dtype=np.float64)

    for chunk_start in range(0, cfg.n_sessions, cfg.chunk_sessions):
        sessions = np.arange(chunk_start, min(chunk_start + cfg.chunk_sessions, cfg.n_sessions))
        chunk_rng = np.random.default_rng([seed, 1, int(chunk_start)])
        regime = (chunk_rng.random(len(sessions)) < starts[sessions] / (cfg.days * SECONDS_PER_DAY)).astype(np.int64)
        # first item: anywhere in the catalogue, by the regime's popularity (one root node)
        current = _sample_anywhere(catalogue, regime, chunk_rng)
        clock = starts[sessions].copy()
        position = offsets[sessions]
        items[position] = current
        times[position] = clock
        for step in range(1, int(lengths[sessions].max())):
            active = np.flatnonzero(lengths[sessions] > step)
            if not len(active):
                break
            here = current[active]
            nxt = np.empty(len(active), dtype=np.int64)
            link = chunk_rng.random(len(active)) < cfg.follow_link
            link &= ~(catalogue.is_new[catalogue.link[here]] & (regime[active] == 0))
            nxt[link] = catalogue.link[here[link]]
            walk = np.flatnonzero(~link)
            depth = np.searchsorted(climb, chunk_rng.random(len(walk)), side="right")
            depth = np.minimum(depth, n_levels - 1)
            for d in np.unique(depth):
                rows = walk[depth == d]
                if d == n_levels - 1:
                    nxt[rows] = _sample_anywhere(catalogue, regime[active[rows]], chunk_rng)
                else:
                    level = n_levels - 2 - d
                    nodes = catalogue.path[here[rows], level]
                    nxt[rows] = catalogue.sample_under(nodes, level, regime[active[rows]], chunk_rng)
            current[active] = nxt
            clock[active] += chunk_rng.exponential(cfg.mean_gap_seconds, size=len(active))
            position = offsets[sessions[active]] + step
            items[position] = nxt
            times[position] = clock[active]

    # Public item ids are a random permutation, so ids carry no trace of the tree.
    public = rng.permutation(cfg.n_items)      # internal item -> public leaf index
    taxonomy = _taxonomy(cfg, catalogue, public)
    leaf_text = _item_text(cfg, catalogue, public, rng) if cfg.item_text else None
    events = pd.DataFrame({
        "sequence": np.repeat(np.arange(1, cfg.n_sessions + 1, dtype=np.int64), lengths),
        "item": public[items].astype(np.int32),
        "time": times,
    })
    return SyntheticData(taxonomy=taxonomy, leaf_text=leaf_text, events=events)


def _sample_anywhere(catalogue: _Catalogue, regime: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An item from the whole catalogue by popularity: sample under a virtual root."""
    out = np.empty(len(regime), dtype=np.int64)
    for r, cumulative in enumerate(catalogue.cumulative):
        rows = np.flatnonzero(regime == r)
        target = rng.random(len(rows)) * cumulative[-1]
        out[rows] = np.clip(np.searchsorted(cumulative, target, side="right") - 1, 0, len(cumulative) - 2)
    return out


def _taxonomy(cfg: SyntheticConfig, catalogue: _Catalogue, public: np.ndarray) -> Taxonomy:
    names = cfg.names()
    sizes = cfg.level_sizes + [cfg.n_items]
    labels = [np.array([f"{names[level]}-{i}" for i in range(sizes[level])], dtype=object)
              for level in range(len(sizes) - 1)]
    labels.append(np.array([f"i{i}" for i in range(cfg.n_items)], dtype=object))
    parents: list[np.ndarray | None] = [None] + [catalogue.parents[level] for level in range(1, len(sizes) - 1)]
    leaf_parent = np.empty(cfg.n_items, dtype=np.int64)
    leaf_parent[public] = catalogue.path[:, -2]
    parents.append(leaf_parent)
    return Taxonomy(names, labels, parents)


def _item_text(cfg: SyntheticConfig, catalogue: _Catalogue, public: np.ndarray,
               rng: np.random.Generator) -> list[str]:
    """'<top word> <...> <finest word> <series word> <filler> <filler>' per item, category words
    replaced by a random word of the same level with probability `text_noise`."""
    sizes = cfg.level_sizes + [cfg.n_items]
    n = cfg.n_items
    columns = []
    for level in range(len(sizes) - 1):
        vocabulary = _words(sizes[level], rng)
        node = catalogue.path[:, level].copy()
        noisy = rng.random(n) < cfg.text_noise
        node[noisy] = rng.integers(0, sizes[level], size=int(noisy.sum()))
        columns.append(vocabulary[node])
    series = _words(int(catalogue.link_group.max()) + 1, rng, syllables=4)
    columns.append(series[catalogue.link_group])
    fillers = _words(500, rng, syllables=2)
    columns.append(fillers[rng.integers(0, len(fillers), size=n)])
    columns.append(fillers[rng.integers(0, len(fillers), size=n)])
    text = columns[0]
    for column in columns[1:]:
        text = text + " " + column
    out = np.empty(n, dtype=object)
    out[public] = text
    return out.tolist()
