"""A wide space seen through few rows: the Procrustes map from the cross moment's range against
the full solver, in one process.

Statistics are summed (float32 products, float64 sums, as in a transport) from ``--rows`` paired
rows of widths ``--widths`` (default: the Qwen2.5-0.5B -> 1.5B MLP hidden space, 4864 -> 8960,
through the 1,446 rows that 32 sentences give its two points). ``procrustes_map`` then runs with
the crop completion and ``--solver``, once with ``rank_bound=n_rows`` (the range path that
``compute_maps`` takes) and once without; the table gives each one's seconds, rank and completed
directions, and the distance between the two maps. Writes JSON.

    python bench/range_cost.py --out bench/results/range_cost_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from warmstart.engine.procrustes import CrossStatistics, procrustes_map


def statistics(rows: int, d_s: int, d_t: int, seed: int) -> CrossStatistics:
    gen = torch.Generator().manual_seed(seed)
    stats = CrossStatistics(d_s, d_t)
    mix = torch.randn(d_s, d_s, generator=gen) / d_s ** 0.5  # correlated source features
    for part in torch.arange(rows).chunk(2):
        a = torch.randn(len(part), d_s, generator=gen) @ mix
        stats.update(a, torch.randn(len(part), d_t, generator=gen))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1446)
    parser.add_argument("--widths", type=int, nargs=2, default=(4864, 8960))
    parser.add_argument("--solver", default="eigh", choices=("svd", "eigh"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/range_cost_cpu2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stats = statistics(args.rows, *args.widths, seed=0)
    results, maps = {}, {}
    for label, bound in (("range (rank_bound=n_rows)", stats.n_rows), ("full", None)):
        started = time.perf_counter()
        fit = procrustes_map(stats, completion="crop", solver=args.solver, rank_bound=bound)
        results[label] = {"seconds": time.perf_counter() - started, "rank": fit.rank,
                          "completed": fit.completed, "residual": fit.residual}
        maps[label] = fit.map
    diff = maps["range (rank_bound=n_rows)"] - maps["full"]
    distance = {"max_abs": float(diff.abs().max()),
                "rms_per_direction": float(diff.norm() / min(args.widths) ** 0.5)}
    table = Table(title=f"{args.widths[0]} x {args.widths[1]} from {stats.n_rows} rows, "
                        f"{args.solver}, {args.threads} threads")
    for col in ("path", "seconds", "rank", "completed", "residual"):
        table.add_column(col)
    for label, r in results.items():
        table.add_row(label, f"{r['seconds']:.1f}", str(r["rank"]), str(r["completed"]),
                      f"{r['residual']:.6f}")
    Console().print(table)
    print(f"distance between the maps: max {distance['max_abs']:.1e}, "
          f"RMS per direction {distance['rms_per_direction']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "range_cost", "rows": stats.n_rows,
                                    "widths": args.widths, "solver": args.solver,
                                    "threads": args.threads, "results": results,
                                    "distance": distance}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
