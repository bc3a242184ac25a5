"""Can map-based inspection be evaded? `juap evade`'s experiment with seeds, and the detector term's cost.

Two parts:

* ``step``: one JUAP training step with the adaptive detector term (each detector kind, mu = 1) as a ratio
  to today's JUAP step against the same interpreter (CAM, Grad-CAM, the demo RTS), timed in interleaved
  rounds in one process (median process CPU time, one torch thread). Goal (issue 29): <= 1.5x.
* ``run``: the shipped experiment (default ``embedded/evasion.yaml``) with ``--seeds`` and
  ``--interpreters``, into ``--out``/run (resumable: finished cells are reused, so an interrupted
  benchmark continues where it stopped; ``--report-only`` writes the report of the cells finished so far).
  Its ``results.md`` answers per detector, non-adaptive beside
  adaptive, with mean +- sd over the seeds; ``evasion.json`` holds every row and the sanity flags.

    python benchmarks/bench_evasion.py [--part step run] [--seeds 0 1 2] [--interpreters cam gradcam rts]
        [--experiment embedded/evasion.yaml] [--set KEY=VALUE ...] [--shard I/N]
        [--out benchmarks/results/evasion]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

import juap
from _common import RESULTS, goal, interleaved, machine, print_goals, print_table, setup_threads, write_json
from bench_attack_step import step_fn
from juap.budget import apply_perturbation
from juap.commands.demo_models import demo_models
from juap.commands.evade import load_evade_config, plan_cells, run_evade, write_report

GOAL = 1.5


def step_costs(repeats: int = 9) -> Dict[str, Any]:
    """Median CPU seconds of a JUAP step with and without each detector's term, per interpreter."""
    from _common import demo_data

    clf, x_train, _, _, info = demo_data(120, 0)
    _, rts_path = demo_models(progress=False)
    x = x_train[:30]
    pattern = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) - 0.5) * (20 / 255)
    rows: List[Dict[str, Any]] = []
    goals = []
    for interp_name in ("cam", "gradcam", "rts"):
        ckpt = {"checkpoint": rts_path} if interp_name == "rts" else {}
        interp = juap.create_interpreter(interp_name, clf, **ckpt)
        common = dict(classifier=clf, interpreter=interp, norm="linf", eps=10, batch_size=30,
                      generator_options={"ngf": 32})  # fmt: skip
        fns = {"JUAP": step_fn(juap.create_attack("juap", **common), x)}
        for kind in juap.list_detectors():
            d_interp = interp if juap.DETECTORS.get(kind).needs_interpreter else None
            det = juap.create_detector(kind, classifier=clf, interpreter=d_interp)
            det.fit(x_train[30:90], apply_perturbation(x_train[30:90], pattern), seed=0)
            det.calibrate(x_train[90:120], fpr=0.05)
            attack = juap.create_attack("juap", **common, detector=det, mu=1.0)
            fns[f"JUAP + {kind}"] = step_fn(attack, x)
        med = interleaved(fns, repeats=repeats, warmup=1)
        for name, t in med.items():
            ratio = t / med["JUAP"]
            rows.append({"interpreter": interp_name, "step": name, "cpu s": t, "x JUAP": ratio})
            if name != "JUAP":
                goals.append(
                    goal(f"{interp_name}: {name} step vs JUAP step", ratio, GOAL, higher_is_better=False)
                )
    print_table(rows, ["interpreter", "step", "cpu s", "x JUAP"])
    print_goals(goals)
    return {"setting": {**info, "batch": 30, "generator": "resnet ngf 32", "repeats": repeats}, "rows": rows,
            "goals": goals}  # fmt: skip


def experiment(args) -> Dict[str, Any]:
    sets = [f"evade.seeds=[{','.join(str(s) for s in args.seeds)}]"]
    if args.interpreters:
        sets.append(f"evade.interpreters=[{','.join(args.interpreters)}]")
    cfg = load_evade_config(args.experiment, sets + list(args.overrides))
    run_dir = args.out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:  # the report of the cells finished so far, e.g. to commit a partial run
        rows, done = write_report(cfg, run_dir)
        res = {"cells": len(plan_cells(cfg.evade)), "complete": done, "seconds": None}  # nothing ran
    else:
        shard = tuple(int(v) for v in args.shard.split("/"))
        res = run_evade(cfg, run_dir, shard=shard, progress=False, say=lambda s: print(s, flush=True))
    print((run_dir / "results.md").read_text())
    flags = json.loads((run_dir / "evasion.json").read_text())["flags"]
    ok = sum(f["status"] == "ok" for f in flags)
    # what the finished cells took when they ran (each cell records it), whichever process ran them
    cell_seconds = sum(
        json.loads(f.read_text()).get("seconds", 0.0) for f in run_dir.glob("cells/*/rows.json")
    )
    return {
        "cells": res["cells"],
        "complete": res["complete"],
        "seconds": res["seconds"],
        "cell_seconds": round(cell_seconds, 1),
        "checks": ok,
        "flagged": len(flags) - ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--part", nargs="+", choices=("step", "run"), default=["step", "run"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--interpreters", nargs="+", help="default: the experiment file's")
    ap.add_argument("--experiment", default="embedded/evasion.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="1/1", metavar="I/N", help="run the cells k with k %% N == I - 1")
    ap.add_argument(
        "--report-only", action="store_true", help="write the report of the finished cells, run none"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "evasion")
    args = ap.parse_args()
    setup_threads(args.threads)
    print(json.dumps(machine()), flush=True)
    out: Dict[str, Any] = {"machine": machine()}
    if "step" in args.part:
        out["step_cost"] = step_costs()
        write_json(args.out / "step_cost.json", {"machine": machine(), **out["step_cost"]})
    if "run" in args.part:
        out["experiment"] = experiment(args)
        write_json(args.out / "experiment.json", {"machine": machine(), **out["experiment"]})


if __name__ == "__main__":
    main()
