"""The evaluator on a small real sample (Diginetica): POP gives every query the same scores, so its
exact ranks follow from the training counts alone and can be checked independently."""

import numpy as np
import pytest

from hmtrec.data.loading import DataConfig, load_data
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.models.registry import build_model, validate_model_params


def popularity_ranks(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank of each target in the order of descending count, ties by lower index."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    position = np.empty(len(counts), dtype=np.int64)
    position[order] = np.arange(len(counts))
    return position[targets] + 1.0


def test_pop_on_diginetica_sample(data_dir):
    prepared = load_data(DataConfig(source="diginetica", path=str(data_dir / "diginetica"), max_sequences=3000))
    taxonomy, test = prepared.taxonomy, prepared.test
    entry, params = validate_model_params("sequence", {"name": "pop"})
    model = build_model(entry, params, taxonomy=taxonomy, dataset=prepared.dataset)
    model.fit(prepared.train)
    settings = EvalSettings(ks=[5, 20], candidate_level="category", candidate_k=3)
    result = evaluate_model(model, test, taxonomy, settings, max_len=20)

    targets = test.leaves[test.targets()]
    assert result["n_cases"] == len(targets) > 20 and result["n_skipped"] == 0
    item_counts = np.bincount(prepared.train.leaves, minlength=taxonomy.n_leaves).astype(float)
    category = taxonomy.ancestor_table("category")
    category_counts = np.bincount(category, weights=item_counts, minlength=taxonomy.n_nodes("category"))
    item_ranks = popularity_ranks(item_counts, targets)
    category_ranks = popularity_ranks(category_counts, category[targets])
    for level, ranks in (("item", item_ranks), ("category", category_ranks)):
        for k in (5, 20):
            assert result["full"][level][f"Recall@{k}"] == pytest.approx(np.mean(ranks <= k))
            assert result["full"][level][f"MRR@{k}"] == pytest.approx(np.mean(np.where(ranks <= k, 1 / ranks, 0)))

    # candidates: the items of the 3 most popular categories, the same for every query
    top = np.lexsort((np.arange(len(category_counts)), -category_counts))[:3]
    inside = np.isin(category, top)
    assert result["candidate_coverage"] == pytest.approx(np.mean(inside[targets]))
    assert result["candidate_fraction"] == pytest.approx(inside.mean())
    restricted = np.where(inside, item_counts, -1.0)      # items outside never outrank
    candidate_ranks = np.where(inside[targets], popularity_ranks(restricted, targets), np.inf)
    assert result["candidate"]["item"]["Recall@20"] == pytest.approx(np.mean(candidate_ranks <= 20))
    assert sum(result["segment_cases"]["history_length"].values()) == result["n_cases"]
