"""The candidate stage of `hmtrec serve`, in process: CPU time per batch of each way to score
candidates (hmtrec/serve/scoring.py), and of a whole `recommend_many` batch per request, at the
batch sizes a server sees under load. The ablation of the compiled kernels (hmtrec/serve/kernels.py).

Ways, each on the same histories and the same query vectors:
- kernel: the compiled kernels choose each query's nodes and score its own leaves (the default with Numba);
- union: nodes chosen in NumPy, the rows of every node the batch chose copied once, one product (without Numba);
- dense: the whole-catalogue product, then a gather of each row's candidates.

Every (batch size, way) is measured `--repeats` times, the ways interleaved within a repeat (so that
a slower period of a shared machine hits them alike); each cell is the median, process CPU time
(one torch thread), which other jobs inflate far less than wall-clock time.

    python benchmarks/serve_stages.py RUN_DIR          # writes the "serve-stages" section
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
WAYS = ("kernel", "union", "dense")


def cpu_ms(call, times: int) -> float:
    started = time.process_time()
    for _ in range(times):
        call()
    return (time.process_time() - started) / times * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 0.35],
                        help="candidate shares of the catalogue (the server's default is a request's choice; 5% in serve-load)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100, help="calls per measurement")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hmtrec.bench.report import markdown_table, update_section
    from hmtrec.serve import kernels
    from hmtrec.serve.artefact import load_sequence_run
    from hmtrec.serve.scoring import pad_histories
    from serve_load import histories_for, machine

    load_before = os.getloadavg()
    artefact = load_sequence_run(args.run_dir)
    scorer = artefact.scorer()
    scorer.trace()
    scorer.prepare_candidates()
    if not kernels.available():
        raise SystemExit("Numba is not installed: the kernel way cannot be measured")
    level = scorer.coarse_levels[-1]
    histories = histories_for(args.run_dir, 512)

    def set_way(way: str) -> None:
        scorer.candidate_path, scorer.kernels = way, way != "union"

    rows = []
    with torch.inference_mode():
        for fraction in args.fractions:
            for size in args.batches:
                chunks = [histories[(i * size) % 512:(i * size) % 512 + size] for i in range(args.calls)]
                chunks = [c if len(c) == size else histories[:size] for c in chunks]
                batch = pad_histories([artefact.encode_history(h)[0] for h in chunks[0]], artefact.config.eval_max_len)
                coarse, query = scorer.query(batch)

                def stage():
                    nodes = scorer.candidate_nodes(coarse[level], level, fraction=fraction)
                    return scorer.candidate_scores(level, query, nodes)

                def whole():
                    for chunk in chunks[:max(1, args.calls // 4)]:
                        artefact.recommend_many(chunk, args.k, candidate_fraction=fraction)

                measured = {way: {"stage": [], "request": []} for way in WAYS}
                for _ in range(args.repeats):
                    for way in WAYS:
                        set_way(way)
                        stage()                                   # warm (node blocks, layouts)
                        measured[way]["stage"].append(cpu_ms(stage, args.calls))
                        per_call = cpu_ms(whole, 1) / max(1, args.calls // 4)
                        measured[way]["request"].append(per_call / size)
                set_way("auto")
                _, ids = scorer.kernel_scores(level, query, scorer.candidate_nodes(coarse[level], level, fraction=fraction))
                candidates = float((ids >= 0).sum()) / size
                for way in WAYS:
                    stage_ms, request_ms = (float(np.median(measured[way][part])) for part in ("stage", "request"))
                    rows.append({"fraction": f"{fraction:.0%}", "batch": size, "way": way, "candidate stage ms / batch": stage_ms,
                                 "vs kernel": stage_ms / float(np.median(measured["kernel"]["stage"])),
                                 "recommend_many CPU ms / request": request_ms,
                                 "candidates / query": f"{candidates:,.0f}"})
                    print(rows[-1], flush=True)
    body = (f"In-process CPU time (one torch thread) of the candidate stage of `hmtrec serve` on the run "
            f"`{args.run_dir.name}` ({artefact.taxonomy.n_leaves:,} items under {artefact.taxonomy.n_nodes(level):,} "
            f"nodes of `{level}`): choosing each query's nodes until they cover a fraction of the "
            f"catalogue and scoring the items under them, given the query vectors; and a whole `recommend_many` "
            f"batch (encoder, candidates, answers with k={args.k}) per request. Ways: kernel = the compiled "
            f"kernels (Numba {kernels.numba.__version__}; the default), union = the nodes chosen in NumPy and "
            f"the rows of every node the batch chose copied once for one product (the way without Numba), "
            f"dense = the whole-catalogue product and a gather. Histories of 1-20 random catalogue items "
            f"(fixed seed); each cell the median of {args.repeats} measurements of {args.calls} calls, the "
            f"ways interleaved. Machine: {machine()}, shared: load average {load_before[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (compare the ways within a row group, measured together).\n\n"
            + markdown_table(rows, float_format="{:.3f}"))
    command = (f"python benchmarks/serve_stages.py {args.run_dir}"
               + (f" --batches {' '.join(map(str, args.batches))}" if args.batches != [1, 8, 16, 32] else "")
               + (f" --fractions {' '.join(f'{f:g}' for f in args.fractions)}" if args.fractions != [0.05, 0.2, 0.35] else "")
               + (f" --repeats {args.repeats}" if args.repeats != 5 else ""))
    print(body)
    if not args.no_report:
        print("wrote", update_section("serve-stages", body, title="Serving: the candidate stage in process",
                                      command=command))


if __name__ == "__main__":
    main()
