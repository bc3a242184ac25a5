"""GPU fast paths: images/s of JUAP-Grad-CAM training steps on ResNet18 and DenseNet121 at 224x224,
batch 30, with and without bf16 autocast, channels_last and torch.compile; and the map error of bf16.

    python benchmarks/bench_gpu_fastpaths.py                      # cuda when available, 224x224, batch 30
    python benchmarks/bench_gpu_fastpaths.py --device cpu --smoke # tiny sizes: checks that it runs

Each variant builds the attack with the options of :class:`juap.attacks.fastpaths.FastPaths` (``amp``,
``channels_last``, ``compile``), runs warm-up steps (compilation happens there; a compile failure falls
back to eager with a warning, reported in the ``note`` column) and times the following steps exactly as
``GeneratorUAP.fit`` runs them (the smoothed-ReLU surrogate, Grad-CAM's double backward, Adam on the
ResNet generator). Classifiers have random weights (1000 classes): the cost does not depend on them.

Map error of bf16: the Grad-CAM maps of the surrogate on the same images with and without bf16 autocast,
min-max normalised per map as the loss and the metrics use them: max and mean absolute difference, and
the top-20% IoU between the two (1 = the same pixels kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))

import juap  # noqa: E402
from juap.attacks.base import rebind  # noqa: E402
from juap.attacks.fastpaths import FastPaths  # noqa: E402
from juap.interpreters.base import normalize_maps  # noqa: E402
from juap.interpreters.smooth_relu import make_surrogate  # noqa: E402
from juap.metrics import iou_topk  # noqa: E402

VARIANTS = {
    "fp32": {},
    "bf16": {"amp": True},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"amp": True, "channels_last": True},
    "compile": {"compile": True},
    "bf16+channels_last+compile": {"amp": True, "channels_last": True, "compile": True},
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_variant(
    clf, x: torch.Tensor, options: Dict[str, bool], *, steps: int, warmup: int, dev: torch.device
) -> Dict[str, Any]:
    """Seconds per step and images/s of JUAP-Grad-CAM steps with the fast paths ``options``."""
    gradcam = juap.create_interpreter("gradcam", clf)
    attack = juap.create_attack(
        "juap", classifier=clf, interpreter=gradcam, norm="l2", eps=2000, batch_size=len(x), device=dev
    )
    attack.noise = torch.rand((1,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(0)).to(dev)
    torch.manual_seed(0)
    G = attack.make_generator().to(dev).train()
    opt = torch.optim.Adam(G.parameters(), lr=attack.lr, betas=attack.betas)
    interp = rebind(gradcam, make_surrogate(clf, tau=attack.tau))
    fast = FastPaths(**options, device=dev)
    G_fwd, interp = fast.prepare(G, interp, clf)
    xs = fast.images(x)
    note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        for _ in range(warmup):
            with fast.autocast():
                step = lambda g, ti: attack.train_step(g, opt, xs, ti)  # noqa: E731
                _, G_fwd, interp = fast.first_step(step, G_fwd, interp)
        _sync(dev)
        warm = time.perf_counter() - t0
    if any("compile" in str(w.message) for w in caught):
        note = "compile fell back to eager: " + str(caught[-1].message)[:120]
    t0 = time.perf_counter()
    for _ in range(steps):
        with fast.autocast():
            attack.train_step(G_fwd, opt, xs, interp)
    _sync(dev)
    wall = time.perf_counter() - t0
    out = {
        "seconds_per_step": wall / steps,
        "images_per_second": len(x) * steps / wall,
        "warmup_seconds": warm,
        "note": note,
    }
    if dev.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 1024**3
        torch.cuda.reset_peak_memory_stats(dev)
    return out


def bf16_map_error(clf, x: torch.Tensor, dev: torch.device) -> Dict[str, float]:
    """Grad-CAM maps (surrogate, predicted classes) with bf16 autocast against float32."""
    gc = juap.create_interpreter("gradcam", make_surrogate(clf))
    x = x.clone().requires_grad_()  # as in training: the maps carry a graph (create_graph=True)
    logits, ref = gc.explain(x)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
        _, got = gc.explain(x, logits.argmax(1))
    a, b = normalize_maps(ref.float().detach()), normalize_maps(got.float().detach())
    diff = (a - b).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "iou_top20": float(iou_topk(a, b, 20).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (64x64, batch 2, 1 step): a run check")
    ap.add_argument("--models", default="resnet18,densenet121")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--map-error-only", action="store_true", help="measure the bf16 map error, no timing")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps, args.warmup = 64, 2, 1, 1
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(
        f"JUAP-Grad-CAM steps at {args.size}x{args.size}, batch {args.batch}, {args.steps} timed steps; "
        f"{info}"
    )
    rows: List[Dict[str, Any]] = []
    errors: Dict[str, Dict[str, float]] = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        clf = juap.create_classifier(name, num_classes=1000).to(dev).eval()
        x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(
            dev
        )
        errors[name] = bf16_map_error(clf, x, dev)
        print(f"{name}: bf16 Grad-CAM map error vs fp32 (normalised maps): {errors[name]}")
        if args.map_error_only:
            continue
        for variant in args.variants.split(","):
            r = time_variant(clf, x, VARIANTS[variant], steps=args.steps, warmup=args.warmup, dev=dev)
            rows.append({"model": name, "variant": variant, **r})
            print(
                f"  {variant:<28} {r['images_per_second']:8.1f} images/s  {r['seconds_per_step']:.3f} s/step"
                + (f"  ({r['note']})" if r["note"] else ""),
                flush=True,
            )
    print("\n| model | variant | images/s | s/step | speed-up | note |\n|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "fp32"), None)
        up = r["images_per_second"] / base["images_per_second"] if base else float("nan")
        print(
            f"| {r['model']} | {r['variant']} | {r['images_per_second']:.1f} | {r['seconds_per_step']:.3f} "
            f"| {up:.2f}x | {r['note']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_fastpaths{'_smoke' if args.smoke else ''}.json"
    path.write_text(
        json.dumps(
            {
                "machine": info,
                "args": vars(args) | {"out": str(args.out)},
                "rows": rows,
                "bf16_map_error": errors,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
