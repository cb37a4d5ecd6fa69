"""`hmtrec recommend RUN_DIR --history "id1 id2 ..." -k 10`: the top-k items after a history, with the
predicted label and probability at every coarser level. Prints JSON on stdout (progress and
messages go to stderr), so the output can be piped.

`--input FILE` recommends for many histories in one process (batched through the model): a `.txt`
file with one history per line (ids separated by spaces or commas), a `.jsonl` file with one
`{"id": ..., "history": [...]}` per line, or a CSV/TSV/Parquet table of (history id, item id) rows
in time order. One JSON line per history, to stdout or `--output`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from hmtrec.errors import DataError, HmtrecError


def split_ids(text: str) -> list[str]:
    return [token for token in text.replace(",", " ").split() if token]


def read_histories(path: Path, history_column: str, item_column: str) -> tuple[list, list[list[str]]]:
    """(ids, histories) from a .txt, .jsonl or CSV/TSV/Parquet file; bad lines name file and row."""
    from hmtrec.api import as_frame, histories_from_frame

    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "is not a file", file=str(path))
    name = path.name.lower()
    if name.endswith(".txt"):
        lines = path.read_text().splitlines()
        return list(range(len(lines))), [split_ids(line) for line in lines]
    if name.endswith(".jsonl"):
        ids, histories = [], []
        for row, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"not JSON ({error.msg})", file=str(path), row=row) from None
            history = record.get("history") if isinstance(record, dict) else None
            if not isinstance(history, list):
                raise DataError("expected an object with a 'history' list", file=str(path), row=row,
                                column="history")
            ids.append(record.get("id", row - 1))
            histories.append([str(item) for item in history])
        return ids, histories
    return histories_from_frame(as_frame(path), history_column=history_column, item_column=item_column,
                                file=str(path))


def register(app: typer.Typer) -> None:
    @app.command()
    def recommend(
        run_dir: Path = typer.Argument(..., help="A run directory written by `hmtrec train`."),
        history: Optional[str] = typer.Option(None, "--history", "-H",
                                              help="Item ids of the history, oldest first, separated by spaces or commas."),
        input: Optional[Path] = typer.Option(None, "--input", "-i",
                                             help="Many histories: .txt (one per line), .jsonl or a CSV/Parquet "
                                                  "table of (history, item) rows."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the JSON lines here (--input)."),
        history_column: str = typer.Option("session", "--history-column", help="Table input: the history id column."),
        item_column: str = typer.Option("item", "--item-column", help="Table input: the item id column."),
        k: int = typer.Option(10, "--k", "-k", min=1, help="How many items to return."),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="Which of the run's models (default: the main one)."),
        exclude_history: bool = typer.Option(False, "--exclude-history",
                                             help="Never recommend an item already in the history."),
        skip_unknown: bool = typer.Option(False, "--skip-unknown",
                                          help="Skip unknown ids (listed under 'skipped') instead of failing."),
        candidate_fraction: Optional[float] = typer.Option(
            None, "--candidate-fraction", help="Score only items under the best coarse nodes, up to this share "
                                               "of the catalogue."),
        top_nodes: Optional[int] = typer.Option(None, "--top-nodes", help="Score only items under this many best "
                                                                          "coarse nodes."),
        indent: Optional[int] = typer.Option(2, "--indent", help="JSON indentation (0: one line)."),
    ):
        """Recommend the next items for a history (or a file of them), with the predicted label at every
        coarser level."""
        from hmtrec.serve.geo_suggest import is_geo_run, suggest_for_run

        if (history is None) == (input is None):
            raise HmtrecError("give --history (one history) or --input FILE (many), not both or neither")
        if is_geo_run(run_dir):  # a geo run answers with regions and the top k cities inside each
            if input is not None:
                raise HmtrecError("--input is for sequence runs; a geo run takes one --history")
            result = suggest_for_run(run_dir, history, k_fine=k)
            sys.stdout.write(json.dumps(result, indent=indent or None, ensure_ascii=False) + "\n")
            return
        from hmtrec.api import Run

        run = Run(run_dir)
        run.artefact(model)  # load (an unknown label fails) before reading any input
        options = dict(k=k, model=model, exclude_history=exclude_history, skip_unknown=skip_unknown,
                       candidate_fraction=candidate_fraction, top_nodes=top_nodes)
        if history is not None:
            ids = split_ids(history)
            if not ids:
                raise HmtrecError("--history is empty: give at least one item id")
            result = run.recommend([ids], **options)[0]
            sys.stdout.write(json.dumps(result, indent=indent or None, ensure_ascii=False) + "\n")
            return
        history_ids, histories = read_histories(input, history_column, item_column)
        results = run.recommend(histories, **options)
        lines = "".join(json.dumps({"id": history_id, **result}, ensure_ascii=False) + "\n"
                        for history_id, result in zip(history_ids, results))
        if output is None:
            sys.stdout.write(lines)
        else:
            from hmtrec.rundir import write_text

            write_text(output, lines)
            sys.stderr.write(f"wrote {len(results)} recommendations to {output}\n")
