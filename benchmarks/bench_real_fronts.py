"""The levers of the headline on the real model: R-JUAP settings against GUAP on EfficientNet-Lite0.

Runs the settings of ``real/fronts_efficientnet_lite0.yaml`` (the image hinge at two lambdas, the margin
hinge, eq 8 with the image hinge, 4x the steps, the constrained mode) and GUAP, per seed, on the photos at
128 px (``--side 224``: the paper's size), then per cell (budget x interpreter):

- every setting's FR, IoU, fooled-only IoU and L1 (mean +- sd over the seeds it has), GUAP's, and the
  shipped recipe's (eq 8, batch hinge, lambda 0.05: ``--settings recipe`` runs it, else its committed figures
  from ``real_model/real_model.json`` are shown);
- which settings hold the headline (FR >= GUAP's - 0.05, IoU >= GUAP's + 0.10, L1 lower), the front's IoU
  at the FR the headline asks for, as ``bench_claims`` judges the embedded fronts; ``fronts.png``;
- like generators: ``guap-unet`` and ``image-0.2-unet`` / ``margin-unet`` (U-JUAP) are judged against
  each other, as R-JUAP is against GUAP with its ResNet.

Units are (seed, cell); each finished cell is kept in ``--out`` and its figures (its main rows, by cell
id: GUAP's with CAM and with Grad-CAM) in ``fronts_cells.json`` beside the tables, which is committed: a
cell found in either is reused, so the benchmark resumes on a fresh machine too. Parallel processes take
alternate units (``--shard 1/2``, ``--shard 2/2``); ``--collect-only`` judges what is finished. ``--seeds``,
``--budgets``, ``--interpreters`` and ``--settings`` (names below) select what runs, to screen on one seed
before spending three; the tables cover every seed finished.

    python benchmarks/bench_real_fronts.py --seeds 0 --budgets linf-10 --interpreters cam --shard 1/2
    python benchmarks/bench_real_fronts.py --seeds 0 1 2 --collect-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch

from bench_claims import KEY, aggregate, fmt, fronts_plot, judge_fronts, pick
from juap.commands.run import collect_rows, load_experiment, main_rows, plan, run_grid
from juap.commands.shipped import CONFIG_DIR
from juap.metrics import HEADLINE_FR_GAP, HEADLINE_IOU_GAIN, headline_misses
from juap.runtime.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
FRONTS = CONFIG_DIR / "real" / "fronts_efficientnet_lite0.yaml"
RECIPE = CONFIG_DIR / "real" / "efficientnet_lite0.yaml"
# the config's variants, in its order
SETTINGS = ("image-0.2", "image-1.0", "margin", "eq8-image", "long", "constrained")
# the same with the U-Net generator (U-JUAP against a U-Net GUAP): ``--settings guap-unet image-0.2-unet``
UNET = "-unet"
UNET_NAMES = ("guap", "image-0.2", "margin")


def _budget(b) -> str:
    return f"{b.norm}-{b.eps:g}"


def experiments(side: int):
    """(name, experiment) of every setting, GUAP and the recipe, at this input size."""
    fronts, recipe = load_experiment(FRONTS), load_experiment(RECIPE)
    if len(fronts.grid.variants) != len(SETTINGS):
        raise SystemExit(f"{FRONTS.name}: {len(fronts.grid.variants)} variants, {len(SETTINGS)} names")

    def sized(e):
        return dataclasses.replace(e, data=dataclasses.replace(e.data, image_size=side))

    pairs = zip(SETTINGS, fronts.grid.variants, strict=True)
    out = {name: sized(_only(fronts, variants=(v,))) for name, v in pairs}
    out["guap"] = sized(_only(recipe, attacks=("guap",)))
    out["recipe"] = sized(_only(recipe, attacks=("juap",)))
    # like generators: GUAP with the U-Net against U-JUAP
    out |= {f"{name}{UNET}": with_unet(out[name]) for name in UNET_NAMES}
    return out


def with_unet(e):
    """The experiment with the U-Net generator: GUAP's is fixed in attack_params, JUAP's is the grid's."""
    params = {k: {**v, "generator": "unet"} if k == "guap" else v for k, v in e.attack_params.items()}
    return dataclasses.replace(_only(e, generators=("unet",)), attack_params=params)


def _only(exp, **grid):
    return dataclasses.replace(exp, grid=dataclasses.replace(exp.grid, **grid))


def units(names, seeds, budgets, interps) -> List[tuple]:
    """(seed, name, budget, interpreter) in run order: seed by seed, the paper's L_inf 10 and CAM first,
    GUAP before the settings of each budget; GUAP has no interpreter (one unit per budget)."""
    out = []
    for seed in seeds:
        for b in budgets:
            out += [(seed, n, b, None) for n in names if n.startswith("guap")]
            for i in interps:
                out += [(seed, n, b, i) for n in names if not n.startswith("guap")]
    return out


def narrowed(exps: Mapping, unit: tuple):
    seed, name, budget, interp = unit
    e = exps[name]
    budgets = tuple(b for b in e.grid.budgets if _budget(b) == budget)
    if not budgets:
        raise SystemExit(f"--budgets {budget}: not in the config ({[_budget(b) for b in e.grid.budgets]})")
    grid = {"budgets": budgets} if interp is None else {"budgets": budgets, "interpreters": (interp,)}
    return dataclasses.replace(_only(e, **grid), seed=seed)


def run_units(
    exps, todo: Sequence[tuple], out: Path, progress: bool, committed: Mapping[str, List[Dict]]
) -> None:
    """Run each unit's cell unless its figures are committed already (a cell id names its configuration,
    seed included, so a changed setting runs again)."""
    for k, u in enumerate(todo, 1):
        seed, name, budget, interp = u
        head = f"== [{k}/{len(todo)}] seed {seed}: {name} at {budget}" + (f" vs {interp}" if interp else "")
        exp = narrowed(exps, u)
        # GUAP's cell is read with every interpreter of the config, a JUAP cell with its own
        wanted = set(exp.evaluate.interpreters) if interp is None else {interp}
        if all(wanted <= {r["interpreter"] for r in committed.get(c.id, [])} for c in plan(exp)):
            print(f"{head}: committed earlier, reused", flush=True)
            continue
        print(head, flush=True)
        say = lambda s: print("  " + s, flush=True)  # noqa: E731
        run_grid(exp, out / f"seed{seed}", progress=progress, say=say)


def collect(exps, out: Path, seeds: Sequence[int], committed: Mapping[str, List[Dict]]) -> List[Dict]:
    """Main rows of every finished cell, tagged with seed and setting name: from the cells' folders, else
    from the committed figures."""
    rows: List[Dict] = []
    for seed in seeds:
        folder = out / f"seed{seed}" / "cells"
        for name, e in exps.items():
            cells = plan(dataclasses.replace(e, seed=seed))
            found, _ = collect_rows(cells, [folder])
            found = main_rows(found)
            have = {r["cell"] for r in found}
            found += [r for c in cells if c.id not in have for r in committed.get(c.id, [])]
            setting = "-" if name.startswith("guap") else name.removesuffix(UNET)
            tag = {"generator": "unet"} if name == "guap" + UNET else {}  # GUAP's rows name none
            rows += [{**r, **tag, "seed": seed, "setting": setting} for r in found]
    return rows


def read_committed(path: Path) -> Dict[str, List[Dict]]:
    """The committed figures: per finished cell (by cell id), its main rows (one per interpreter it was
    measured with: GUAP's cell has one for CAM and one for Grad-CAM)."""
    out: Dict[str, List[Dict]] = {}
    for r in json.loads(path.read_text()) if path.is_file() else []:
        out.setdefault(r["cell"], []).append(r)
    return out


def write_committed(path: Path, rows: Sequence[Mapping], committed: Mapping[str, List[Dict]]) -> None:
    """Every finished cell's main rows (figures only: no folder), merged with what was committed."""
    merged = {(r["cell"], r["interpreter"]): r for rs in committed.values() for r in rs}
    for r in rows:
        merged[r["cell"], r["interpreter"]] = {k: v for k, v in r.items() if k != "folder" and "[" not in k}
    order = sorted(merged.values(), key=lambda r: (r["seed"], r["budget"], r["cell"], r["interpreter"]))
    write_json(path, order)


def committed_recipe() -> List[Dict]:
    """The recipe's figures from the main real-model benchmark (mean over its seeds), per cell."""
    path = ROOT / "benchmarks" / "results" / "real_model" / "real_model.json"
    if not path.is_file():
        return []
    cells = json.loads(path.read_text())["cells"]
    return [{**c, "setting": "recipe"} for c in cells if c["method"] == "R-JUAP" and c["setting"] == "-"]


def as_8bit(rows: Sequence[Mapping], cell: Mapping) -> str:
    """The cell's FR and IoU with the perturbation as saved in 8 bits (mean over its seeds)."""
    mine = [
        r
        for r in rows
        if all(r.get(k) == cell.get(k) for k in KEY) and r.get("fooling_ratio_8bit") is not None
    ]
    if not mine:
        return "-"
    fr = statistics.fmean(r["fooling_ratio_8bit"] for r in mine)
    ious = [r["iou_8bit"] for r in mine if r.get("iou_8bit") is not None]  # maps: the main interpreter's
    return f"{fr:.3f}, " + (f"{statistics.fmean(ious):.3f}" if ious else "-")


def _table_lines(agg, rows, guap, juap, label: str, prefix: str) -> List[str]:
    lines = []
    for budget in dict.fromkeys(r["budget"] for r in agg):
        for interp in dict.fromkeys(r["interpreter"] for r in juap):
            g = pick(guap, interpreter=interp, budget=budget)
            if not g:
                continue
            lines.append(
                f"| {budget} | {interp} | {label} | {g['seeds']} | {fmt(g, 'fooling_ratio')} | "
                f"{fmt(g, 'iou')} | {fmt(g, 'iou_fooled')} | {fmt(g, 'l1')} | {as_8bit(rows, g)} | "
                f"need FR >= {g['fooling_ratio'] - HEADLINE_FR_GAP:.3f}, "
                f"IoU >= {g['iou'] + HEADLINE_IOU_GAIN:.3f} |"
            )
            for r in sorted(
                (r for r in juap if r["interpreter"] == interp and r["budget"] == budget),
                key=lambda r: -r["fooling_ratio"],
            ):
                misses = headline_misses(r, g)
                verdict = "holds" if not misses else "misses " + ", ".join(misses)
                lines.append(
                    f"| {budget} | {interp} | {prefix}{r['setting']} | {r['seeds']} | "
                    f"{fmt(r, 'fooling_ratio')} | {fmt(r, 'iou')} | {fmt(r, 'iou_fooled')} | "
                    f"{fmt(r, 'l1')} | {as_8bit(rows, r)} | {verdict} |"
                )
    return lines


def report(rows: List[Dict], side: int, results: Path, seeds) -> Dict:
    agg = aggregate(rows)
    lines = [
        "| budget | interpreter | setting | seeds | FR | IoU | fooled-only IoU | L1 | FR, IoU in 8 bits "
        "| headline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fronts: List[Dict] = []
    # like generators: R-JUAP against GUAP (ResNet), U-JUAP against GUAP with the U-Net
    for gen, method, label in (("-", "R-JUAP", "GUAP"), ("unet", "U-JUAP", "GUAP (U-Net)")):
        guap = [r for r in agg if r["method"] == "GUAP" and r["generator"] == gen]
        juap = [r for r in agg if r["method"] == method]
        points = [r for r in rows if r["method"] == method]  # per seed: judge_fronts aggregates them
        if method == "R-JUAP" and side == 128:  # the recipe's earlier figures where it was not rerun here
            kept = [
                r
                for r in committed_recipe()
                if pick(guap, interpreter=r["interpreter"], budget=r["budget"])
                and not pick(juap, setting="recipe", interpreter=r["interpreter"], budget=r["budget"])
            ]
            juap += kept
            points += [{**r, "seed": -1} for r in kept]  # a mean already: its sd is in the table
        fronts += judge_fronts({"fronts": points}, guap)  # GUAP is the head; the recipe is one more point
        lines += _table_lines(agg, rows, guap, juap, label, "" if method == "R-JUAP" else method + " ")
    table = "\n".join(lines)
    print("\n" + table)
    suffix = "" if side == 128 else f"_{side}"
    results.mkdir(parents=True, exist_ok=True)
    write_text(results / f"fronts{suffix}.md", table + "\n")
    if fronts:
        fronts_plot(fronts, results / f"fronts{suffix}.png", label_all=True)
    payload = {
        "configs": [str(FRONTS.relative_to(CONFIG_DIR)), str(RECIPE.relative_to(CONFIG_DIR))],
        "side": side,
        "seeds": list(seeds),
        "settings": dict(zip(SETTINGS, load_experiment(FRONTS).grid.variants, strict=True)),
        "cells": agg,
        "fronts": fronts,
        "thresholds": {"fr_gap": HEADLINE_FR_GAP, "iou_gain": HEADLINE_IOU_GAIN},
    }
    write_json(results / f"fronts{suffix}.json", payload)
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-real-fronts"), help="the cells' folders")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_model"))
    ap.add_argument("--side", type=int, default=128, help="input size (128; the paper's 224)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", default=["linf-10", "l2-1142.9"])
    ap.add_argument("--interpreters", nargs="+", default=["cam", "gradcam"])
    ap.add_argument(
        "--settings",
        nargs="+",
        default=["guap", *SETTINGS],
        choices=["guap", "recipe", *SETTINGS, *(n + UNET for n in UNET_NAMES)],
        help="what to run (default: GUAP and every setting; 'recipe' runs the shipped recipe too)",
    )
    ap.add_argument("--shard", default="1/1", help="I/N: this process runs every N-th unit from the I-th")
    ap.add_argument("--collect-only", action="store_true", help="judge the finished cells, run none")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    i, n = (int(x) for x in args.shard.split("/"))
    out = Path(args.out) / f"side{args.side}"
    exps = experiments(args.side)
    cells_file = Path(args.results) / (
        "fronts_cells.json" if args.side == 128 else f"fronts_cells_{args.side}.json"
    )
    committed = read_committed(cells_file)
    t0 = time.perf_counter()
    if not args.collect_only:
        todo = units(args.settings, args.seeds, args.budgets, args.interpreters)[i - 1 :: n]
        run_units(exps, todo, out, args.progress, committed)
    # the tables cover every seed finished, not only this process's
    seeds = sorted({*args.seeds, *(r["seed"] for rs in committed.values() for r in rs)})
    rows = collect(exps, out, seeds, committed)
    write_committed(cells_file, rows, read_committed(cells_file))  # re-read: another shard may have written
    print(f"\nEfficientNet-Lite0, {args.side} px: {len(rows)} rows ({time.perf_counter() - t0:.0f} s)")
    report(rows, args.side, Path(args.results), seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
