"""Cost of a differentiable Grad-CAM map (eq 11) with its double backward, relative to plain backprop.

For each setting, one "step" is timed per method, side by side in the same run (interleaved repeats,
median reported):

* ``plain``: logits = f(x), cross-entropy, gradient w.r.t. the input (the cost of a classifier-only attack);
* ``gradcam``: logits and Grad-CAM map from one forward (``explain``), an L2 loss on the normalised map
  (eq 13) plus the cross-entropy, gradient w.r.t. the input through ``create_graph=True``;
* ``cam``, and Grad-CAM on the smoothed-ReLU surrogate (eq 15) and at an inner layer, for reference.

Goal: the default-layer Grad-CAM step costs at most 1.5x the plain step.

Usage: ``python benchmarks/bench_gradcam_cost.py [--quick] [--threads N] [--device cuda]``
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import juap
from juap.interpreters import make_surrogate, normalize_maps

GOAL = 1.5
SETTINGS = [("resnet18", 64, 8), ("resnet18", 224, 8), ("small_resnet", 64, 32)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(clf: juap.Classifier, x: torch.Tensor) -> Dict[str, Callable[[], None]]:
    with torch.no_grad():
        y = clf(x).argmax(1)
    surrogate = make_surrogate(clf)
    interps = {
        "gradcam": juap.create_interpreter("gradcam", clf),
        "cam": juap.create_interpreter("cam", clf),
        "gradcam surrogate": juap.create_interpreter("gradcam", surrogate),
    }
    inner = {"resnet18": "layer3", "small_resnet": "layer2"}.get(clf.arch)
    if inner is not None:
        interps[f"gradcam {inner} surrogate"] = juap.create_interpreter("gradcam", surrogate, layer=inner)
    refs = {}
    for name, interp in interps.items():
        with torch.no_grad():
            refs[name] = normalize_maps(interp(x, y))

    def plain(model=clf) -> None:
        xg = x.clone().requires_grad_()
        torch.autograd.grad(F.cross_entropy(model(xg), y), xg)

    def with_map(name: str) -> Callable[[], None]:
        interp, ref = interps[name], refs[name]

        def step() -> None:
            xg = x.clone().requires_grad_()
            logits, maps = interp.explain(xg)  # one forward: logits and the predicted class's map
            l_interp = (normalize_maps(maps) - ref).square().sum((1, 2)).sqrt().mean()  # eq 13
            loss = F.cross_entropy(logits, y) + l_interp
            torch.autograd.grad(loss, xg)

        return step

    steps = {"plain": plain, "plain surrogate": lambda: plain(surrogate)}
    steps.update({name: with_map(name) for name in interps})
    return steps


def _time(
    steps: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> Dict[str, float]:
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():  # interleaved, so drifts in machine load hit every method alike
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (3 instead of 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    print(
        f"Grad-CAM cost per batch vs plain forward+backward to the input; device={device}, "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}, "
        f"median of {repeats} (after {warmup} warm-up)"
    )
    print(f"goal: default-layer Grad-CAM step <= {GOAL}x the plain step\n")
    print(f"{'setting':<26}{'method':<28}{'ms/batch':>10}{'ratio':>8}")
    verdicts = []
    for arch, size, batch in SETTINGS:
        torch.manual_seed(0)
        kw = {"num_classes": 6} if arch == "small_resnet" else {}
        clf = juap.create_classifier(arch, **kw).to(device).eval()
        x = torch.rand(batch, 3, size, size, device=device)
        med = _time(_steps(clf, x), repeats, warmup, device)
        setting = f"{arch} {size}x{size} b{batch}"
        for name, t in med.items():
            print(f"{setting:<26}{name:<28}{t * 1e3:>10.1f}{t / med['plain']:>7.2f}x")
        ratio = med["gradcam"] / med["plain"]
        verdict = "OK" if ratio <= GOAL else "ABOVE GOAL"
        verdicts.append(f"{setting}: default-layer Grad-CAM {ratio:.2f}x plain -> {verdict}")
        print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
