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
the photos at 128 px); Score-CAM, Ablation-CAM (1280 channels: a forward pass each, per image) and
Captum's Occlusion (a forward pass per window) are left out on a CPU, and the faithfulness areas are
measured for CAM and the finer Grad-CAM only (``--faithful``). About 40 min a seed for ``--images 51`` on
one CPU thread.

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

import torch
from tqdm.auto import tqdm

import juap
from _common import RESULTS, demo_data, machine, setup_threads, write_json
from juap.app.artifacts import load_perturbation
from juap.budget import apply_perturbation
from juap.commands.build import build_interpreter
from juap.commands.evade import _predict, build_bench, load_evade_config
from juap.faithfulness import deletion_insertion, road

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
        # a forward pass per channel (1280) or per occluded window, per image: hours on a CPU
        "skip": ("pgc:scorecam", "pgc:ablationcam", "captum:occlusion"),
        "faithful": ("cam", "gradcam@blocks.4"),  # Grad-CAM at the CAM layer gives CAM's map (GAP + linear)
    },
}
ATTACKS = ("UAP", "SGD-UAP", "GUAP", "R-JUAP")
CURVES = tuple(f"{k}_{w}" for k in ("deletion", "insertion", "road") for w in ("benign", "adversarial"))
FIGURES = ("iou", "l1", "iou_fooled", "l1_fooled") + CURVES + tuple(f"{c}_fooled" for c in CURVES)


def perturbation_path(run: Path, attack: str, seed: int, budget: str = "linf10") -> Path:
    """Where ``attack``'s perturbation of ``seed`` lies: in an evasion run (``bench_evasion.py``, ``juap
    evade``: round 0 in ``shared/``, R-JUAP in the CAM cell) or in a ``juap demo`` run's
    ``perturbations/``."""
    if (run / "perturbations").is_dir():  # a demo run folder (R-JUAP: R-JUAP-CAM)
        return run / "perturbations" / f"{'R-JUAP-CAM' if attack == 'R-JUAP' else attack}.safetensors"
    if attack == "R-JUAP":  # trained against CAM, in the CAM cell
        return run / "cells" / f"cam_{budget}_s{seed}" / "perturbations" / "R-JUAP.safetensors"
    return run / "shared" / f"{budget}_s{seed}" / f"{attack}.safetensors"


def evasion_fooling_ratios(run: Path, seed: int, budget: str = "linf10") -> Dict[str, float]:
    """Round 0's fooling ratios as an evasion run measured them (its ``rows.json``, on the same
    detector-test images): ``{}`` where that run has none."""
    rows = run / "cells" / f"cam_{budget}_s{seed}" / "rows.json"
    if not rows.is_file():
        return {}
    return {
        r["perturbation"]: r["fooling_ratio"]
        for r in json.loads(rows.read_text())["rows"]
        if r["attack_round"] == 0 and r["perturbation"] in ATTACKS
    }


def faithfulness(clf, interps, x, x_hat, args, seed: int, benign_cache: Dict) -> Dict[str, Dict[str, Any]]:
    """Per image: the deletion / insertion areas of each interpreter's benign map on ``x`` (benign class) and
    adversarial map on ``x_hat`` (adversarial class), and of a random map on both (the reference every map
    is read against: the perturbation being removed with the pixels moves every curve, whatever the
    order). Means over all images and over the fooled ones; the random maps are the same for every attack.
    The benign maps and their curves do not depend on the attack: ``benign_cache`` keeps them per seed."""
    bs = args.batch_size
    kw = dict(steps=args.steps, baseline=args.baseline, batch_size=4 * bs)

    def maps_of(it, z, c):
        return torch.cat([it(z[i : i + bs], c[i : i + bs]).detach() for i in range(0, len(z), bs)])

    def curves(z, m, c, name):
        res = deletion_insertion(clf, z, m, c, **kw)
        if args.road is not None and (not args.road or name in args.road or name == "random"):  # ROAD
            res["road"] = road(clf, z, m, c, seed=seed, batch_size=bs)["combined"]
        return res

    if "curves" not in benign_cache:  # the benign predictions, the random maps, and every benign map's curves
        benign = _predict(clf, x, bs)
        g = torch.Generator().manual_seed(10_000 + seed)
        benign_cache.update(pred=benign, random=torch.rand(x.shape[0], *x.shape[-2:], generator=g))
        benign_cache["curves"] = {"random": curves(x, benign_cache["random"], benign, "random")}
        benign_cache["curves"].update(
            {n: curves(x, maps_of(it, x, benign), benign, n) for n, it in interps.items()}
        )
    benign = benign_cache["pred"]
    adv = _predict(clf, x_hat, bs)
    fooled = benign != adv
    out: Dict[str, Dict[str, Any]] = {}
    for n in ["random", *interps]:
        am = benign_cache["random"] if n == "random" else maps_of(interps[n], x_hat, adv)
        areas = {"benign": benign_cache["curves"][n], "adversarial": curves(x_hat, am, adv, n)}
        row = {}
        for which, res in areas.items():
            for kind in ("deletion", "insertion", "road"):
                if kind in res:
                    row[f"{kind}_{which}"] = res[kind].mean().item()
                    row[f"{kind}_{which}_fooled"] = res[kind][fooled].mean().item() if fooled.any() else None
        out[n] = row
    return out


def measure_seed(bench, part: Dict[str, Any], seed: int, names: List[str], args) -> Dict[str, Any]:
    clf, x = bench
    split = x
    if args.images and args.images < len(x):  # evenly spread over the split, which is ordered by photo
        x = x[torch.linspace(0, len(x) - 1, args.images).round().long()]
    faithful = sorted(set(args.faithful or part["faithful"] or names) & set(names))
    interps = {n: build_interpreter(n, clf) for n in names}
    out: Dict[str, Any] = {"seed": seed, "n_images": len(x), "steps": args.steps, "baseline": args.baseline}
    out["attacks"] = {}
    # the committed evasion benchmark's figures for these perturbations (else the run's own): a perturbation
    # made again on another machine must fool the same images
    made_by = evasion_fooling_ratios(part["committed"], seed) or evasion_fooling_ratios(part["run"], seed)
    benign_cache: Dict[str, Any] = {}  # filled by the first attack's faithfulness, read by the others
    for attack in ATTACKS:
        path = perturbation_path(part["run"], attack, seed)
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run benchmarks/bench_evasion.py for seed {seed} first")
        n_hat = load_perturbation(path)
        ev = juap.evaluate(
            clf, n_hat, x, interpreters=interps, batch_size=args.batch_size, progress=False
        )  # fmt: skip
        rows = {n: {k: m.get(k) for k in FIGURES if k in m} for n, m in ev["interpreters"].items()}
        curves = faithfulness(
            clf, {n: interps[n] for n in faithful}, x, apply_perturbation(x, n_hat), args, seed, benign_cache
        )
        for n in faithful:
            rows[n].update(curves[n])
        fr = ev["fooling_ratio"]
        out["attacks"][attack] = {
            "fooling_ratio": fr, "interpreters": {n: rows[n] for n in names}, "random": curves["random"],
        }  # fmt: skip
        if attack in made_by:  # the same perturbation as the evasion run's, on its images (the whole split)
            if "split_pred" not in benign_cache:
                benign_cache["split_pred"] = _predict(clf, split, args.batch_size)
            fooled = benign_cache["split_pred"] != _predict(
                clf, apply_perturbation(split, n_hat), args.batch_size
            )
            out["attacks"][attack]["fooling_ratio_split"] = fooled.float().mean().item()
            out["attacks"][attack]["fooling_ratio_evasion_run"] = made_by[attack]
        print(
            f"  seed {seed} {attack}: FR {fr:.3f}"
            + (
                f" (whole split {out['attacks'][attack]['fooling_ratio_split']:.3f}, evasion run: "
                f"{made_by[attack]:.3f})"
                if attack in made_by
                else ""
            ),
            flush=True,
        )
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
    rand = {
        a: {k: mean_sd([c["attacks"][a].get("random", {}).get(k) for c in cells]) for k in FIGURES}
        for a in ATTACKS
    }
    for n in names + ["random"]:
        for attack in ATTACKS:
            f = rand[attack] if n == "random" else agg[attack][n]
            if f["deletion_benign"] is None:
                continue
            lines.append(
                f"| {n} | {attack} | {fmt(f['deletion_benign'])} | {fmt(f['deletion_adversarial'])} | "
                f"{fmt(f['insertion_benign'])} | {fmt(f['insertion_adversarial'])} |"
            )
    if any(rand[a]["deletion_adversarial_fooled"] for a in ATTACKS):  # cells measured with the reference
        kinds = ["deletion", "insertion"] + (["road"] if any(rand[a]["road_benign"] for a in ATTACKS) else [])
        lines += [
            "",
            "### The fooled images, against a random map",
            "",
            "Only the images the perturbation fools; each figure beside a random map's on the same image and "
            "class (`random`: uniform noise, the same for every attack). Removing pixels also removes the "
            "perturbation, which moves the adversarial curves whatever the order; the gap to the random map "
            "is what the map's order adds (deletion: below random = faithful; insertion: above"
            + (
                "; ROAD: most and least relevant first combined, noisy linear imputation, above"
                if "road" in kinds
                else ""
            )
            + ").",
            "",
            "| interpreter | attack | "
            + " | ".join(f"{k} benign (random) | {k} adv. (random)" for k in kinds)
            + " |",
            "|---" * (2 * len(kinds) + 2) + "|",
        ]
        for n in names:
            for attack in ATTACKS:
                f, r = agg[attack][n], rand[attack]
                if f["deletion_adversarial_fooled"] is None:
                    continue
                keys = [f"{k}_{w}_fooled" for k in kinds for w in ("benign", "adversarial")]
                lines.append(
                    f"| {n} | {attack} | "
                    + " | ".join(f"{f[k][0]:.3f} ({r[k][0]:.3f})" if f[k] else "-" for k in keys)
                    + " |"
                )
        lines += [
            "",
            "Gap to the random map on the fooled images, adversarial map on the perturbed image (mean ± sd "
            "over seeds; deletion: more negative = more faithful; insertion"
            + (" and ROAD" if "road" in kinds else "")
            + ": more positive):",
            "",
            "| interpreter | " + " | ".join(f"{a} {k}" for a in ATTACKS for k in kinds) + " |",
            "|---" * (len(kinds) * len(ATTACKS) + 1) + "|",
        ]
        for n in names:
            if agg["GUAP"][n]["deletion_adversarial_fooled"] is None:
                continue
            gaps = []
            for attack in ATTACKS:
                for kind in kinds:
                    k = f"{kind}_adversarial_fooled"
                    vals = [
                        c["attacks"][attack]["interpreters"][n][k] - c["attacks"][attack]["random"][k]
                        for c in cells
                        if c["attacks"][attack]["interpreters"][n].get(k) is not None
                    ]
                    gaps.append(fmt(mean_sd(vals)))
            lines.append(f"| {n} | " + " | ".join(gaps) + " |")
    evasion = [c["attacks"][a].get("fooling_ratio_evasion_run") for c in cells for a in ATTACKS]
    if any(v is not None for v in evasion):
        same = all(
            abs(
                c["attacks"][a].get("fooling_ratio_split", c["attacks"][a]["fooling_ratio"])
                - c["attacks"][a]["fooling_ratio_evasion_run"]
            )
            < 1e-6  # a float32 mean; one image of the split moves it by 1 / n
            for c in cells
            for a in ATTACKS
            if c["attacks"][a].get("fooling_ratio_evasion_run") is not None
        )
        lines += [
            "",
            "The perturbations' fooling ratios "
            + ("equal" if same else "**differ from**")
            + " those the committed evasion benchmark recorded for them on the same images "
            "(`fooling_ratio_evasion_run`).",
        ]
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
    ap.add_argument(
        "--images", type=int, help="N detector-test images, evenly spread over the split (default: all)"
    )
    ap.add_argument("--steps", type=int, default=16, help="deletion / insertion steps")
    ap.add_argument(
        "--baseline", default="blur", choices=("blur", "black", "mean"), help="what removed pixels become"
    )
    ap.add_argument("--faithful", nargs="+", help="the interpreters that get the curves (default: per part)")
    ap.add_argument(
        "--road",
        nargs="*",
        metavar="NAME",
        help="also ROAD (Rong et al. 2022) for these interpreters (none named: every one with the curves)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--demo-run", type=Path, default=Path("runs/demo"), help="--part demo: its run folder")
    ap.add_argument(
        "--run",
        type=Path,
        help="embedded / lite0: the evasion run folder (default: the part's, under results/)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "peer_maps")
    args = ap.parse_args()
    setup_threads(args.threads)
    print(json.dumps(machine()), flush=True)
    for part_name in args.part:
        part = dict(PARTS[part_name])
        out_dir = args.out / (part_name if args.baseline == "blur" else f"{part_name}_{args.baseline}")
        (out_dir / "cells").mkdir(parents=True, exist_ok=True)
        part["committed"] = part["run"]
        if args.run and part_name != "demo":
            part["run"] = args.run
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
