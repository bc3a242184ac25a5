"""The paper's experiment on a real pretrained ImageNet CNN, offline: EfficientNet-Lite0 on real photos.

Runs the grid of the shipped experiment file ``real/efficientnet_lite0.yaml`` (``juap run`` runs the
same cells): UAP, SGD-UAP, GUAP and R-JUAP x CAM, Grad-CAM on ``efficientnet_lite0`` (``weights:
imagenet``, from ``juap[pretrained]``) with the photo set of :mod:`juap.data.photos` (539 training crops
of 10 photos, 533 test crops of 10 other photos), at L_inf 10 and L_2 1142.9 (the paper's 2000 at 224 px,
per pixel at side 128). GUAP and R-JUAP at L_inf 10 run with 3 seeds, every other cell with one. Then:

- per cell, mean +- sd of FR, L1, IoU and fooled-only IoU, and per R-JUAP cell "holds" or "does not hold"
  against the headline: FR >= GUAP's - 0.05, IoU >= GUAP's + 0.10, L1 lower;
- ``juap detect``'s AUROC for GUAP vs R-JUAP (reference inspector and deployable detector, first seed);
- costs: seconds per GUAP and R-JUAP step at the grid's setting (128 px, batch 30) and at the paper's
  (224 px, batch 30), and the peak memory of one step at 224 px and batch 30, each measured in a fresh
  subprocess as ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set, so it
  includes Python, torch and the model; the model-only baseline is printed beside it).

Sizing (2-core CPU, one torch thread, the other core busy): a GUAP or R-JUAP step at 128 px and batch 30
took about 1 s (224 px: about 3-4x that), so 12 generator cells of 150 steps plus evaluations on 533 test
crops fit in about an hour; 224 px and 3000 steps would take days. Hence side 128 (a 4x4 CAM map), 150
steps (lr 1e-3, see the config's header), batch 30 (the paper's). Cells are resumable: run it again to
continue (results in ``--out``; the cells' folders are not committed, the tables are).

    python benchmarks/bench_real_model.py [--out DIR] [--seeds 0 1 2] [--skip-costs] [--skip-detection]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch

from bench_claims import aggregate, detection, fmt, pick
from juap.commands.run import BudgetConfig, load_experiment, main_rows, run_grid, write_results
from juap.commands.shipped import CONFIG_DIR
from juap.metrics import HEADLINE_FR_GAP, HEADLINE_IOU_GAIN, headline_misses
from juap.runtime.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIG = CONFIG_DIR / "real" / "efficientnet_lite0.yaml"
FR_GAP, IOU_GAIN = HEADLINE_FR_GAP, HEADLINE_IOU_GAIN
PAPER_BUDGET = "linf-10"


def _phase(exp, *, attacks: Sequence[str], budgets=None, seed: int):
    grid = dataclasses.replace(exp.grid, attacks=tuple(attacks), budgets=budgets or exp.grid.budgets)
    return dataclasses.replace(exp, grid=grid, seed=seed)


def run_cells(out: Path, seeds: Sequence[int], progress: bool, front: Sequence[float] = ()) -> List[Dict]:
    """Every cell, cheapest-to-most-needed first: the first seed's generator and SGD-UAP cells, the other
    seeds' GUAP and R-JUAP at L_inf 10, then UAP (the slowest baseline). Rows tagged with their seed.
    ``front``: R-JUAP at L_inf 10 with these lambdas too (first seed), the FR-IoU trade-off."""
    exp = load_experiment(CONFIG)
    linf10 = tuple(b for b in exp.grid.budgets if b == BudgetConfig(norm="linf", eps=10.0))
    phases = [(seeds[0], _phase(exp, attacks=("sgd_uap", "guap", "juap"), seed=seeds[0]))]
    phases += [(s, _phase(exp, attacks=("guap", "juap"), budgets=linf10, seed=s)) for s in seeds[1:]]
    if front:
        sweep = _phase(exp, attacks=("juap",), budgets=linf10, seed=seeds[0])
        sweep = dataclasses.replace(
            sweep, grid=dataclasses.replace(sweep.grid, variants=tuple({"lam": lam} for lam in front))
        )
        phases.append((seeds[0], sweep))
    phases += [(seeds[0], dataclasses.replace(exp, seed=seeds[0]))]  # adds UAP; the rest is reused
    rows: Dict[tuple, Dict] = {}
    for seed, e in phases:
        run_dir = out / f"seed{seed}"
        print(f"== seed {seed}: {', '.join(e.grid.attacks)}", flush=True)
        res = run_grid(e, run_dir, progress=progress, say=lambda s: print("  " + s, flush=True))
        write_results(e, run_dir, res)
        for r in main_rows(res["rows"]):
            rows[(seed, r["cell"], r["interpreter"])] = {**r, "seed": seed}
    return list(rows.values())


def judge(agg: Sequence[Mapping]) -> List[Dict]:
    """R-JUAP vs GUAP per interpreter and budget (means over seeds)."""
    out = []
    print(f"\nHeadline: R-JUAP's FR >= GUAP's - {FR_GAP}, IoU >= GUAP's + {IOU_GAIN}, L1 lower")
    for budget in dict.fromkeys(r["budget"] for r in agg):
        for interp in dict.fromkeys(r["interpreter"] for r in agg):
            j = pick(agg, method="R-JUAP", interpreter=interp, budget=budget, setting="-")
            g = pick(agg, method="GUAP", interpreter=interp, budget=budget)
            if not (j and g):
                continue
            misses = headline_misses(j, g)
            figures = (
                f"FR {fmt(j, 'fooling_ratio')} vs {fmt(g, 'fooling_ratio')}, IoU {fmt(j, 'iou')} vs "
                f"{fmt(g, 'iou')}, L1 {fmt(j, 'l1')} vs {fmt(g, 'l1')}, fooled-only IoU "
                f"{fmt(j, 'iou_fooled')} vs {fmt(g, 'iou_fooled')}"
            )
            verdict = "holds" if not misses else "does not hold (misses: " + ", ".join(misses) + ")"
            print(f"  [{verdict}] R-JUAP-{interp} vs GUAP at {budget}: {figures}")
            out.append({"interpreter": interp, "budget": budget, "holds": not misses, "misses": misses})
    return out


def print_cells(agg: Sequence[Mapping]) -> str:
    """The per-cell table (markdown), printed and returned."""
    lines = [
        "| budget | method | interpreter | seeds | FR | L1 | IoU | fooled-only IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"UAP": 0, "SGD-UAP": 1, "GUAP": 2, "R-JUAP": 3}
    key = lambda r: (r["budget"], order.get(r["method"], 9), r["interpreter"], r["setting"])  # noqa: E731
    for r in sorted(agg, key=key):
        lines.append(
            f"| {r['budget']} | {r['method']}"
            + (f" (vs {r['interpreter']})" if r["method"] == "R-JUAP" else "")
            + (f", {r['setting']}" if r["setting"] != "-" else "")
            + f" | {r['interpreter']} | {r['seeds']} | {fmt(r, 'fooling_ratio')} | {fmt(r, 'l1')} | "
            f"{fmt(r, 'iou')} | {fmt(r, 'iou_fooled')} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    return text


_COST_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {bench!r})
    import juap
    from bench_attack_step import step_fn
    side, bs, which, reps = {side}, {bs}, {which!r}, {reps}
    clf = juap.create_classifier("efficientnet_lite0", weights="imagenet")
    for p in clf.parameters():
        p.requires_grad_(False)
    x = torch.rand(bs, 3, side, side, generator=torch.Generator().manual_seed(0))
    common = dict(classifier=clf, norm="linf", eps=10, batch_size=bs)
    if which == "GUAP":
        attack = juap.create_attack("guap", **common)
    else:
        attack = juap.create_attack("juap", interpreter=juap.create_interpreter(which, clf), **common)
    step = step_fn(attack, x)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"times": times, "peak_kib": peak, "before_step_kib": base}}))
    """
)


def measure_step(which: str, side: int, bs: int, reps: int) -> Dict:
    """One fresh process: ``reps`` training steps of GUAP or R-JUAP-``which``; times and peak RSS."""
    code = _COST_SCRIPT.format(bench=str(ROOT / "benchmarks"), side=side, bs=bs, which=which, reps=reps)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cost measurement failed: {res.stderr.strip().splitlines()[-1:]}")
    m = json.loads(res.stdout.strip().splitlines()[-1])
    warm = m["times"][1:] or m["times"]  # the first step pays for allocations
    return {
        "step": which,
        "side": side,
        "batch": bs,
        "s_per_step": sorted(warm)[len(warm) // 2],
        "peak_gib": m["peak_kib"] / 2**20,
        "before_step_gib": m["before_step_kib"] / 2**20,
    }


def costs() -> List[Dict]:
    """Seconds per step (median of the warm steps) at 128 and 224 px, batch 30; peak RSS at 224 px."""
    out = []
    for side, reps in ((128, 4), (224, 3)):
        for which in ("GUAP", "cam", "gradcam"):
            r = measure_step(which, side, 30, reps)
            out.append(r)
            print(
                f"  {('GUAP' if which == 'GUAP' else 'R-JUAP-' + which):<16} {side} px, batch 30: "
                f"{r['s_per_step']:.2f} s/step, peak RSS {r['peak_gib']:.2f} GiB "
                f"(before the first step {r['before_step_gib']:.2f} GiB)",
                flush=True,
            )
    for side in (128, 224):
        g = next(r for r in out if r["side"] == side and r["step"] == "GUAP")
        for which in ("cam", "gradcam"):
            j = next(r for r in out if r["side"] == side and r["step"] == which)
            j["ratio_to_guap"] = j["s_per_step"] / g["s_per_step"]
            print(
                f"  R-JUAP-{which} / GUAP at {side} px: {j['ratio_to_guap']:.2f}x (goal <= 1.5x): "
                f"{'met' if j['ratio_to_guap'] <= 1.5 else 'not met'}"
            )
    peak = max(r["peak_gib"] for r in out if r["side"] == 224)
    print(
        f"  peak memory of one step at 224 px, batch 30: {peak:.2f} GiB (goal < 8 GiB): "
        f"{'met' if peak < 8 else 'not met'}"
    )
    return out


def print_detection(rows: Sequence[Mapping]) -> None:
    print("\nDetection (juap detect, first seed, L_inf 10): AUROC, 0.5 = the perturbation evades it")
    for interp in dict.fromkeys(r["interpreter"] for r in rows):
        for det in dict.fromkeys(r["detector"] for r in rows if r["interpreter"] == interp):
            vals = {r["attack"]: r for r in rows if r["interpreter"] == interp and r["detector"] == det}
            if {"GUAP", "R-JUAP"} <= set(vals):
                g, j = vals["GUAP"], vals["R-JUAP"]
                print(
                    f"  {interp:<8} {det:<28} GUAP {g['auroc']:.3f} (FR {g['fooling_ratio']:.2f})  "
                    f"R-JUAP {j['auroc']:.3f} (FR {j['fooling_ratio']:.2f})"
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-real-model"), help="the cells' folders")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_model"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--skip-costs", action="store_true")
    ap.add_argument("--skip-detection", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument(
        "--front", nargs="*", type=float, default=[], help="R-JUAP at L_inf 10 with these lambdas too"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out, results = Path(args.out), Path(args.results)
    t0 = time.perf_counter()
    cost_rows: List[Dict] = []
    if not args.skip_costs:
        print("Costs (fresh subprocess each; one torch thread):", flush=True)
        cost_rows = costs()
    rows = run_cells(out, args.seeds, args.progress, args.front)
    agg = aggregate(rows)
    print(f"\nEfficientNet-Lite0 on real photos, 128 px ({time.perf_counter() - t0:.0f} s so far):")
    table = print_cells(agg)
    verdicts = judge(agg)
    det: List[Dict] = []
    if not args.skip_detection:
        det = detection(rows, PAPER_BUDGET)
        print_detection(det)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    results.mkdir(parents=True, exist_ok=True)
    suffix = "_front" if args.front else ""  # a sweep run keeps the main run's files
    write_text(results / f"table{suffix}.md", table + "\n")
    write_json(
        results / f"real_model{suffix}.json",
        {
            "config": str(CONFIG.relative_to(CONFIG_DIR)),
            "seeds": args.seeds,
            "front_lambdas": args.front,
            "cells": agg,
            "headline": verdicts,
            "detection": det,
            "costs": cost_rows,
            "thresholds": {"fr_gap": FR_GAP, "iou_gain": IOU_GAIN},
            "seconds": time.perf_counter() - t0,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
