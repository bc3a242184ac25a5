"""Run every benchmark (or some) in one command, print their tables and goals, write JSON.

    python benchmarks/run_all.py [--only NAME ...] [--quick] [--threads N] [--json OUT] [--out DIR]

Names (issue 9's items): time_to_fool (1), maps (2), pgd (3), step_cost (4), scaling (5, with a plot),
memory (6). Each module also runs alone: ``python benchmarks/bench_<module>.py [--quick]``.
Results go to ``--out`` (default ``benchmarks/results/``): one JSON per benchmark, ``scaling.png``, and
the summary (``--json``, default ``<out>/run_all.json``) with the machine and every goal met or missed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from _common import RESULTS, machine, setup_threads, write_json

BENCHMARKS = {
    "time_to_fool": "bench_time_to_fool",
    "maps": "bench_map_throughput",
    "pgd": "bench_pgd",
    "step_cost": "bench_attack_step",
    "scaling": "bench_scaling",
    "memory": "bench_memory",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument("--json", type=Path, default=None, help="the summary JSON (default <out>/run_all.json)")
    args = ap.parse_args()
    setup_threads(args.threads)
    names = args.only or list(BENCHMARKS)
    start = machine()
    print(f"machine: {start}")
    print(f"running: {', '.join(names)}{' (quick)' if args.quick else ''}\n", flush=True)
    t0 = time.perf_counter()
    summary = {"machine": start, "quick": args.quick, "benchmarks": {}, "goals": []}
    failed = 0
    for name in names:
        t = time.perf_counter()
        print(f"=== {name} ===", flush=True)
        try:
            res = importlib.import_module(BENCHMARKS[name]).run(args.quick, args.out)
        except Exception as e:  # one benchmark failing must not lose the others' results
            failed += 1
            traceback.print_exc()
            res = {"name": name, "error": f"{type(e).__name__}: {e}", "goals": []}
        res["seconds"] = round(time.perf_counter() - t, 1)
        write_json(args.out / f"{name}.json", res)
        summary["benchmarks"][name] = {k: v for k, v in res.items() if k not in ("curves",)}
        summary["goals"] += [{"benchmark": name, **g} for g in res.get("goals", [])]
        print(f"--- {name}: {res['seconds']:.0f} s\n", flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["machine_at_end"] = machine()
    out = args.json or args.out / "run_all.json"
    write_json(out, summary)
    print("=== goals ===")
    for g in summary["goals"]:
        v = g["value"]
        vs = "n/a" if v is None else f"{v:.2f}"
        print(
            f"  [{'MET   ' if g['met'] else 'MISSED'}] {g['benchmark']}: {g['goal']}: {vs} "
            f"(goal {g['target']})"
        )
    met = sum(g["met"] for g in summary["goals"])
    print(
        f"\n{met}/{len(summary['goals'])} goals met; {failed} benchmark(s) failed; "
        f"total {summary['seconds'] / 60:.1f} min; "
        f"load at end {summary['machine_at_end']['load_average_1_5_15']}"
    )
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
