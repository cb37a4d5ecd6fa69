"""Result tables: Markdown and rich, built from real evaluator output."""

import json

import numpy as np

import pytest
from rich.console import Console

from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.evaluate.report import print_results, results_table, rich_tables, segments_table
from test_evaluate_ranking import hand_case  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture(scope="module")
def results():
    taxonomy, data, model = hand_case()
    with_candidates = evaluate_model(model, data, taxonomy, EvalSettings(ks=[1, 2], candidate_k=1), max_len=10)
    full_only = evaluate_model(model, data, taxonomy, EvalSettings(ks=[1, 2]), max_len=10)
    json.dumps(with_candidates)  # results are JSON-ready
    return {"hand": with_candidates, "no-candidates": full_only}


def test_markdown_table_has_models_as_rows_and_level_metric_columns(results):
    text = results_table(results, metrics=["Recall@2", "MRR@2"])
    full, candidate = text.split("**Candidates**")
    header = full.splitlines()[2]
    assert header == "| model | cat Recall@2 | cat MRR@2 | item Recall@2 | item MRR@2 | cases | eval s |"
    assert "| hand |" in full and "| no-candidates |" in full
    # candidate section: only the model evaluated with candidates; item MRR@2 = (1 + 1/2) / 4
    assert "top cat nodes, fixed_k (k=1)" in candidate
    rows = [line for line in candidate.splitlines() if line.startswith("| hand")]
    assert len(rows) == 1 and "| 0.3750 |" in rows[0] and rows[0].endswith("| 0.5000 | 0.3750 |")
    assert "no-candidates" not in candidate
    assert "**Candidates**" not in results_table({"x": results["no-candidates"]})


def test_segments_table(results):
    text = segments_table(results["hand"], "history_length", metrics=["Recall@1"])
    lines = text.splitlines()
    assert lines[0] == "| history_length | cases | Recall@1 | cand Recall@1 | coverage |"
    # targets 3 (1 event before), 4 (2), 1 (3) and 2 (1): buckets 1 -> 2 cases, 2-3 -> 2 cases
    assert lines[2].startswith("| 1 | 2 |") and lines[3].startswith("| 2-3 | 2 |")
    with pytest.raises(KeyError, match="no segment 'city'"):
        segments_table(results["hand"], "city")


def test_rich_tables_render(results):
    tables = rich_tables(results)
    assert [t.title.split(" (")[0] for t in tables] == ["Full catalogue", "Candidates"]
    assert tables[0].row_count == 4 and tables[1].row_count == 2   # one row per (model, level)
    console = Console(width=200, record=True)
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert "Recall@2" in text and "0.3750" in text
    print_results(results)


def test_results_table_has_a_training_frequency_breakdown():
    from hmtrec.data.sequences import SequenceData
    from hmtrec.evaluate.report import breakdown_table
    taxonomy, data, model = hand_case()
    train = SequenceData(data.leaves, data.offsets, np.arange(data.n_sequences))
    with_frequency = evaluate_model(model, data, taxonomy, EvalSettings(ks=[1, 2]), max_len=10, train=train)
    counts = with_frequency["segment_cases"]["target_frequency"]
    text = results_table({"hand": with_frequency, "old": results_without_segments()}, metrics=["Recall@2"])
    assert "**By the target item's training frequency** (item" in text
    table = breakdown_table({"hand": with_frequency, "old": results_without_segments()}, "target_frequency",
                            metrics=["MRR@2"])
    header, _, hand, old = table.splitlines()
    assert header == "| model | " + " | ".join(f"{bucket} ({n:,}) MRR@2" for bucket, n in counts.items()) + " |"
    mrr = with_frequency["segments"]["target_frequency"]
    assert hand == "| hand | " + " | ".join(f"{mrr[b]['item']['MRR@2']:.4f}" for b in counts) + " |"
    assert old == "| old | " + " | ".join("–" for _ in counts) + " |"


def results_without_segments():
    taxonomy, data, model = hand_case()
    return evaluate_model(model, data, taxonomy, EvalSettings(ks=[1, 2], segments=[]), max_len=10)
