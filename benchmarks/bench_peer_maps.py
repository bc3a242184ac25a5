"""Maps the attack never trained against, and whether the kept maps still explain (issue 31).

For each perturbation of an evasion run's round 0 (UAP, SGD-UAP and GUAP, which use no interpreter, and
R-JUAP trained against CAM), with the seeds that run has: the fooling ratio, and under every evaluation
interpreter B (juap's CAM and Grad-CAM, Grad-CAM at an earlier, finer layer, every pytorch-grad-cam method
and every Captum attribution) the IoU and L1 of the maps, and the deletion / insertion areas of the benign
map on the benign image and of the adversarial map on the perturbed one. The images are the run's detector
test split, which no attack trained or was picked on; the classifier is the run's own, unmodified.

    python benchmarks/bench_peer_maps.py --part embedded lite0 [--seeds 0 1 2] [--images N]

``embedded``: ``results/evasion/run`` (``embedded/evasion.yaml``, the demo classifier, 64 px).
``demo``: the perturbations of a ``juap demo`` run folder (``--demo-run``; R-JUAP: R-JUAP-CAM), on the demo's
300 test images (one seed: the demo's).
``lite0``: ``results/evasion/lite0/run`` (``real/evasion_efficientnet_lite0.yaml``, EfficientNet-Lite0 on
the photos at 128 px); Score-CAM and Ablation-CAM (1280 channels: a forward pass each, per image) are left
out on a CPU, and the faithfulness areas are measured for juap's own maps only (``--faithful``).

The perturbations are the evasion benchmark's (``bench_evasion.py``; kept on disk, not committed): run it
first. Each seed's figures are a cell in ``--out``/PART/cells (resumable); ``table.md`` / ``peer_maps.json``
give the mean +- sd over the seeds finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm.auto import tqdm

import juap
from _common import RESULTS, demo_data, machine, setup_threads, write_json
from juap.app.artifacts import load_perturbation
from juap.commands.build import build_interpreter
from juap.commands.evade import build_bench, load_evade_config

PARTS = {
    "embedded": {
        "run": RESULTS / "evasion" / "run",
        "experiment": "embedded/evasion.yaml",
        "finer": "layer2",  # 16x16 at 64 px (the CAM layer, layer3, is 8x8)
        "skip": (),
        "faithful": None,  # every interpreter
    },
    "demo": {  # the nine perturbations of a `juap demo` run (--demo-run), on the demo's 300 test images
        "run": Path("runs/demo"),
        "experiment": None,
        "finer": "layer2",
        "skip": (),
        "faithful": ("cam", "gradcam", "gradcam@layer2", "pgc:gradcam++", "captum:integrated_gradients"),
    },
    "lite0": {
        "run": RESULTS / "evasion" / "lite0" / "run",
        "experiment": "real/evasion_efficientnet_lite0.yaml",
        "finer": "blocks.4",  # 8x8 at 128 px (the CAM layer is 4x4)
        "skip": ("pgc:scorecam", "pgc:ablationcam"),
        "faithful": ("cam", "gradcam", "gradcam@blocks.4"),
    },
}
ATTACKS = ("UAP", "SGD-UAP", "GUAP", "R-JUAP")
FIGURES = (
    "iou",
    "l1",
    "iou_fooled",
    "l1_fooled",
    "deletion_benign",
    "deletion_adversarial",
    "insertion_benign",
    "insertion_adversarial",
)


def perturbation_path(run: Path, attack: str, seed: int, budget: str = "linf10") -> Path:
    if run.name != "run":  # a demo run folder: its perturbations/ (R-JUAP: the one trained against CAM)
        return run / "perturbations" / f"{'R-JUAP-CAM' if attack == 'R-JUAP' else attack}.safetensors"
    if attack == "R-JUAP":  # trained against CAM, in the CAM cell
        return run / "cells" / f"cam_{budget}_s{seed}" / "perturbations" / "R-JUAP.safetensors"
    return run / "shared" / f"{budget}_s{seed}" / f"{attack}.safetensors"


def measure_seed(bench, part: Dict[str, Any], seed: int, names: List[str], args) -> Dict[str, Any]:
    clf, x = bench
    x = x[: args.images] if args.images else x
    faithful = set(args.faithful or part["faithful"] or names)
    interps = {n: build_interpreter(n, clf) for n in names}
    out: Dict[str, Any] = {"seed": seed, "n_images": len(x), "steps": args.steps, "baseline": args.baseline}
    out["attacks"] = {}
    for attack in ATTACKS:
        path = perturbation_path(part["run"], attack, seed)
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run benchmarks/bench_evasion.py for seed {seed} first")
        n_hat = load_perturbation(path)
        rows: Dict[str, Any] = {}
        # one pass with the interpreters that get the deletion / insertion curves, one with the others
        for group, steps in (
            (sorted(faithful & set(names)), args.steps),
            (sorted(set(names) - faithful), None),
        ):
            if not group:
                continue
            ev = juap.evaluate(
                clf, n_hat, x, interpreters={n: interps[n] for n in group}, batch_size=args.batch_size,
                faithfulness=steps, faithfulness_baseline=args.baseline, progress=False,
            )  # fmt: skip
            rows.update({n: {k: m.get(k) for k in FIGURES if k in m} for n, m in ev["interpreters"].items()})
            fr = ev["fooling_ratio"]
        out["attacks"][attack] = {"fooling_ratio": fr, "interpreters": {n: rows[n] for n in names}}
        print(f"  seed {seed} {attack}: FR {fr:.3f}", flush=True)
    return out


def mean_sd(values: List[Optional[float]]) -> Optional[tuple]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(ms: Optional[tuple]) -> str:
    return "-" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def report(out_dir: Path, part_name: str, cells: List[Dict[str, Any]], names: List[str]) -> str:
    seeds = [c["seed"] for c in cells]
    agg: Dict[str, Any] = {}
    for attack in ATTACKS:
        a = {"fooling_ratio": mean_sd([c["attacks"][attack]["fooling_ratio"] for c in cells])}
        for n in names:
            a[n] = {
                k: mean_sd([c["attacks"][attack]["interpreters"][n].get(k) for c in cells]) for k in FIGURES
            }
        agg[attack] = a
    lines = [
        f"# Maps under interpreters the attack never trained against ({part_name})",
        "",
        f"Seeds {seeds}, {cells[0]['n_images']} detector-test images each (mean ± sd over the seeds). "
        "R-JUAP was trained against CAM; UAP, SGD-UAP and GUAP use no interpreter. IoU: top-k IoU of the "
        "benign and the adversarial map (mean over k = 10..50%); higher = the map kept. Fooling ratios: "
        + ", ".join(f"{a} {fmt(agg[a]['fooling_ratio'])}" for a in ATTACKS)
        + ".",
        "",
        "## Transfer table: IoU (L1) per evaluation interpreter",
        "",
        "| interpreter | " + " | ".join(ATTACKS) + " | R-JUAP - GUAP IoU |",
        "|---" * (len(ATTACKS) + 2) + "|",
    ]
    for n in names:
        cells_txt = []
        for attack in ATTACKS:
            iou, l1 = agg[attack][n]["iou"], agg[attack][n]["l1"]
            cells_txt.append(f"{fmt(iou)} ({l1[0]:.3f})" if iou else "-")
        diffs = [
            c["attacks"]["R-JUAP"]["interpreters"][n]["iou"] - c["attacks"]["GUAP"]["interpreters"][n]["iou"]
            for c in cells
        ]
        lines.append(f"| {n} | " + " | ".join(cells_txt) + f" | {fmt(mean_sd(diffs))} |")
    if any(agg[a][n]["iou_fooled"] for a in ATTACKS for n in names):  # cells measured with it
        lines += ["", "## The fooled images only: IoU", ""]
        lines += ["An image that is not fooled keeps its map; these compare the fooled ones' maps.", ""]
        lines += ["| interpreter | " + " | ".join(ATTACKS) + " |", "|---" * (len(ATTACKS) + 1) + "|"]
        lines += [
            f"| {n} | " + " | ".join(fmt(agg[a][n]["iou_fooled"]) for a in ATTACKS) + " |" for n in names
        ]
    lines += [
        "",
        "## Faithfulness: deletion and insertion areas, benign map on the benign image -> adversarial map on "
        "the perturbed image",
        "",
        "Deletion (lower = the map points at what the decision rests on) and insertion (higher = the same), "
        f"{cells[0].get('baseline', 'blur')} baseline, {cells[0].get('steps', 16)} steps, for the class each "
        "map explains (the benign and the adversarial prediction).",
        "",
        "| interpreter | attack | deletion benign | deletion adv. | insertion benign | insertion adv. |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        for attack in ATTACKS:
            f = agg[attack][n]
            if f["deletion_benign"] is None:
                continue
            lines.append(
                f"| {n} | {attack} | {fmt(f['deletion_benign'])} | {fmt(f['deletion_adversarial'])} | "
                f"{fmt(f['insertion_benign'])} | {fmt(f['insertion_adversarial'])} |"
            )
    text = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(text)
    write_json(
        out_dir / "peer_maps.json", {"machine": machine(), "seeds": seeds, "mean_sd": agg, "cells": cells}
    )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--part", nargs="+", choices=tuple(PARTS), default=["embedded"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, help="the first N detector-test images only (default: all)")
    ap.add_argument("--steps", type=int, default=16, help="deletion / insertion steps")
    ap.add_argument(
        "--baseline", default="blur", choices=("blur", "black", "mean"), help="what removed pixels become"
    )
    ap.add_argument("--faithful", nargs="+", help="the interpreters that get the curves (default: per part)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--demo-run", type=Path, default=Path("runs/demo"), help="--part demo: its run folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "peer_maps")
    args = ap.parse_args()
    setup_threads(args.threads)
    print(json.dumps(machine()), flush=True)
    for part_name in args.part:
        part = dict(PARTS[part_name])
        out_dir = args.out / (part_name if args.baseline == "blur" else f"{part_name}_{args.baseline}")
        (out_dir / "cells").mkdir(parents=True, exist_ok=True)
        if part_name == "demo":  # the demo classifier and the demo's own test images (demo.seed 0)
            part["run"] = args.demo_run
            clf, _, x_test, _, _ = demo_data(300, 300, 0)
            bench = (clf, x_test)
        else:
            b = build_bench(
                load_evade_config(part["experiment"]), out_dir, progress=False, say=lambda s: None
            )
            bench = (b.classifier, b.test)
        names = ["cam", "gradcam", f"gradcam@{part['finer']}"] + [
            n for n in juap.list_interpreters(peers=True) if ":" in n and n not in part["skip"]
        ]
        cells = []
        for seed in tqdm(args.seeds, desc=part_name):
            cell = out_dir / "cells" / f"s{seed}.json"
            if not cell.is_file():  # resumable: a finished seed is read back
                write_json(cell, measure_seed(bench, part, seed, names, args))
            cells.append(json.loads(cell.read_text()))
        print(report(out_dir, part_name, cells, names), flush=True)


if __name__ == "__main__":
    main()
