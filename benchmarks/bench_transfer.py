"""Transfer across real models: perturbations learnt on EfficientNet-Lite0, Lite1 and Lite2, each evaluated
on every one of them (issue 32).

    python benchmarks/bench_transfer.py [--attacks guap juap] [--seeds 0] [--size 128 | --size native]
        [--steps 100] [--threads 2] [--out DIR]

The photos (juap.data.photos: 539 crops of 10 photos learn, 533 crops of 10 others measure), at ``--size``
px for every model (``native``: each model's own, 224 / 240 / 260, and a perturbation is resized to the
model it is applied to, bilinear, then projected into its budget). GUAP and R-JUAP (CAM, the real-model
recipe: eq 8, batch hinge, lambda 0.05) at L_inf ``--eps``, a ResNet generator with ngf 32, and random signs
of the same norm (``noise``, the floor: what any perturbation of that size changes). The matrix
gives the fooling ratio (and CAM IoU) of every perturbation on every model, as applied in 8 bits; the
diagonal is white-box, the rest transfer. Needs ``juap[photos]`` (the weights install offline).
Resumable: the learnt perturbations are kept in ``--out``/perturbations, and the figures of an earlier run
with the same sizes, budget and steps in ``transfer.json`` are reused (add ``juap`` to a ``guap`` run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import juap
from _common import RESULTS, machine, print_table, setup_threads, write_json
from juap.app.artifacts import resize_perturbation, save_perturbation
from juap.budget import quantize_8bit
from juap.data import DataConfig, load_splits, to_tensors
from juap.evaluation import evaluate

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RECIPES = {
    "guap": {"objective": "untargeted"},
    "juap": {"lam": 0.05, "delta": -0.8},  # real/efficientnet_lite0.yaml's ImageNet recipe
}


def previous_rows(path: Path, setting: Dict[str, Any]) -> Dict[tuple, Dict[str, Any]]:
    """The rows of an earlier run (by attack, seed, source, target) when it had the same ``setting``."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old.get("setting", {}).get(k) != v for k, v in setting.items()):
        return {}
    return {(r["attack"], r["seed"], r["learnt on"], r["applied to"]): r for r in old["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["guap", "juap", "noise"], choices=[*RECIPES, "noise"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--size", default="128", help="input size for every model, or 'native'")
    ap.add_argument("--eps", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "transfer")
    args = ap.parse_args()
    setup_threads(args.threads)
    print(json.dumps(machine()), flush=True)
    clfs = {m: juap.create_classifier(m, weights="imagenet") for m in MODELS}
    size = {m: (c.native_size if args.size == "native" else int(args.size)) for m, c in clfs.items()}
    data: Dict[int, Any] = {}
    for s in sorted(set(size.values())):
        splits = load_splits(DataConfig(name="photos", image_size=s))
        data[s] = (to_tensors(splits.train)[0], to_tensors(splits.test)[0])
    cams = {m: juap.create_interpreter("cam", c) for m, c in clfs.items()}
    # resumable: the figures of an earlier run with the same sizes, budget and steps are kept
    done = previous_rows(args.out / "transfer.json", {"sizes": size, "eps": args.eps, "steps": args.steps})
    rows: List[Dict[str, Any]] = []
    for seed in args.seeds:
        for attack in args.attacks:
            for source, clf in clfs.items():
                kept = [done[attack, seed, source, t] for t in MODELS if (attack, seed, source, t) in done]
                if len(kept) == len(MODELS):
                    rows += kept
                    print(f"  {attack} on {source} (seed {seed}): measured earlier, kept", flush=True)
                    continue
                x_train, _ = data[size[source]]
                path = args.out / "perturbations" / f"{attack}_{source}_s{seed}.safetensors"
                if attack == "noise":  # the floor: random signs of the same L_inf norm
                    g = torch.Generator().manual_seed(seed)
                    shape = (3, size[source], size[source])
                    n_hat = (torch.randint(0, 2, shape, generator=g).float() * 2 - 1) * args.eps / 255
                elif path.is_file():  # resumable: a perturbation already learnt is reused
                    n_hat = juap.app.artifacts.load_perturbation(path)
                else:
                    interp = {"interpreter": cams[source]} if attack == "juap" else {}
                    a = juap.create_attack(
                        attack, classifier=clf, norm="linf", eps=args.eps, steps=args.steps, batch_size=30,
                        lr=1e-3, eval_every=25, seed=seed, generator_options={"ngf": 32}, **interp,
                        **RECIPES[attack],
                    )  # fmt: skip
                    torch.manual_seed(seed)
                    t0 = time.perf_counter()
                    n_hat = a.fit(x_train[:485], val_data=x_train[485:], progress=False)
                    print(f"  {attack} on {source} (seed {seed}) learnt in {time.perf_counter() - t0:.0f} s",
                          flush=True)  # fmt: skip
                    save_perturbation(path.with_suffix(""), n_hat, attack=attack, norm="linf", eps=args.eps)
                for target, tclf in clfs.items():
                    n = n_hat
                    if size[target] != n.shape[-1]:
                        n = resize_perturbation(n, (size[target],) * 2, norm="linf", eps=args.eps)
                    q = quantize_8bit(n, norm="linf", eps=args.eps)
                    _, x_test = data[size[target]]
                    ev = evaluate(tclf, q, [(x_test, torch.zeros(len(x_test), dtype=torch.long))],
                                  interpreters={"cam": cams[target]})  # fmt: skip
                    fr, iou = ev["fooling_ratio"], ev["interpreters"]["cam"]["iou"]
                    rows.append({"attack": attack, "seed": seed, "learnt on": source, "applied to": target,
                                 "fooling_ratio": fr, "cam_iou": iou})  # fmt: skip
                    print(f"    -> {target}: FR {fr:.3f} IoU {iou:.3f}", flush=True)
    table = []
    for attack in args.attacks:
        for source in MODELS:
            mine = [r for r in rows if r["attack"] == attack and r["learnt on"] == source]
            line = {"attack": attack, "learnt on": source}
            for target in MODELS:
                for key, col in (("fooling_ratio", "FR"), ("cam_iou", "IoU")):
                    vals = [r[key] for r in mine if r["applied to"] == target]
                    line[f"{col} on {target[-5:]}"] = sum(vals) / len(vals)
            table.append(line)
    print(f"\nFooling ratio as applied in 8 bits, mean over seeds {args.seeds} (rows: learnt on; columns:"
          " applied to)")  # fmt: skip
    print_table(table, ["attack", "learnt on", *(f"FR on {m[-5:]}" for m in MODELS)])
    print("\nCAM IoU on the model applied to (same rows and columns)")
    print_table(table, ["attack", "learnt on", *(f"IoU on {m[-5:]}" for m in MODELS)])
    write_json(args.out / "transfer.json", {"machine": machine(), "setting": {**vars(args), "sizes": size},
               "rows": rows, "table": table})  # fmt: skip


if __name__ == "__main__":
    main()
