"""The baselines against their reference implementations, side by side in one run on the demo setting.

* UAP: the time of one pass of :class:`juap.attacks.uap.UAP` vs ART's ``UniversalPerturbation(attacker=
  "deepfool")`` over the same images, same budget (L_inf 10/255), same DeepFool settings (overshoot 0.02,
  10 iterations, 10 class gradients), with both fooling rates (ART's formula). Goal: ours >= 20x faster.
* PGD: :class:`juap.attacks.pgd.PGD` vs torchattacks' ``PGD`` (L_inf 10) and ``PGDL2`` (L_2 2000 at 224,
  scaled to 64x64), 10 steps, step 2.5 * eps / steps, random start from the same seed, on the same images;
  with both success rates (prediction changed). Goal: ours no slower (speed-up >= 1). Times are medians of
  interleaved repeats.

Goals are judged on process CPU time, which a shared machine's load disturbs far less than wall time
(with ``--threads 1`` the two agree on an idle machine); wall times and their ratio are printed beside.

The model is the demo ``small_resnet`` (widths 32, 64, 128; 6 classes; 64x64), trained for a few
seconds on procedural textures (stripes at four angles, a blob, a checkerboard) so that its decisions
are not degenerate. juap's attacks freeze the classifier's parameters (``requires_grad=False``); the
same frozen model is given to ART and torchattacks, so no method pays for parameter gradients.

Usage: ``python benchmarks/bench_baselines.py [--quick] [--threads N] [--images N] [--seed S]``
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import juap
from juap.attacks.pgd import PGD
from juap.attacks.uap import UAP
from juap.budget import l2_budget_for_size

UAP_GOAL, PGD_GOAL = 20.0, 1.0
SIZE, CLASSES = 64, 6


def patterns(n: int, *, size: int = SIZE, seed: int = 0):
    """Six procedural texture classes at random frequency, phase and colours -> (x (n, 3, s, s), y (n,))."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq = 3 + 3 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    axes = (yy, xx, (xx + yy) / math.sqrt(2), (xx - yy) / math.sqrt(2))
    waves = [torch.sin(2 * math.pi * freq * u + phase) for u in axes]
    cx, cy = (0.25 + 0.5 * torch.rand(n, 1, 1, generator=g) for _ in range(2))
    blob = 2 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.03) - 1
    checker = (waves[1] * torch.sin(2 * math.pi * freq * yy)).sign()
    pattern = torch.stack(waves + [blob, checker], 1)[torch.arange(n), y]  # (n, s, s) in [-1, 1]
    c1, c2 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    t = (pattern.unsqueeze(1) + 1) / 2
    x = c1 * t + c2 * (1 - t) + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 1), y


def demo_classifier(steps: int, seed: int) -> juap.Classifier:
    torch.manual_seed(seed)
    clf = juap.create_classifier("small_resnet", num_classes=CLASSES)
    x, y = patterns(2000, seed=seed + 1)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    clf.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def bench_uap(clf: juap.Classifier, x: torch.Tensor, *, seed: int, batch_size: int) -> Dict[str, float]:
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    ours = UAP(
        classifier=clf,
        norm="linf",
        eps=10,
        max_passes=1,
        target_fooling_rate=1.0,
        overshoot=0.02,
        deepfool_steps=10,
        nb_grads=10,
        batch_size=batch_size,
        seed=seed,
    )
    art_clf = PyTorchClassifier(
        model=clf,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=clf.num_classes,
        clip_values=(0.0, 1.0),
    )
    theirs = UniversalPerturbation(
        art_clf,
        attacker="deepfool",
        delta=0.0,
        max_iter=1,
        eps=10 / 255,
        norm=np.inf,
        verbose=False,
        attacker_params={"epsilon": 0.02, "max_iter": 10, "nb_grads": 10, "verbose": False},
    )
    ours_wall, ours_cpu = _timed(lambda: ours.fit(x, progress=False))
    random.seed(seed)  # ART shuffles with Python's random
    x_np = x.numpy()
    peer_wall, peer_cpu = _timed(lambda: theirs.generate(x_np))
    return {
        "ours": ours_cpu,
        "peer": peer_cpu,
        "ours_wall": ours_wall,
        "peer_wall": peer_wall,
        "ours_rate": ours.fooling_rate_,
        "peer_rate": theirs.fooling_rate,
    }


def _timed(fn: Callable[[], object]) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_pgd(
    clf: juap.Classifier, x: torch.Tensor, *, norm: str, eps: float, repeats: int, seed: int
) -> Dict[str, float]:
    import torchattacks

    with torch.no_grad():
        y = clf(x).argmax(1)
    steps, step = 10, 2.5 * eps / 10
    ours = PGD(
        classifier=clf, norm=norm, eps=eps, steps=steps, step_size=step, random_start=True, use_labels=True
    )
    peer_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = peer_cls(clf, eps=eps / 255, alpha=step / 255, steps=steps, random_start=True)
    methods = {"ours": ours, "peer": theirs}
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in methods}
    rates: Dict[str, float] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, attack in methods.items():  # interleaved: machine-load drifts hit both alike
            torch.manual_seed(seed)  # the same random start for both
            out: List[torch.Tensor] = []
            times[name].append(_timed(lambda attack=attack, out=out: out.append(attack(x, y))))
            with torch.no_grad():
                rates[name] = (clf(out[0]).argmax(1) != y).float().mean().item()
    result = {f"{name}_rate": rate for name, rate in rates.items()}
    for name, ts in times.items():
        result[f"{name}_wall"] = statistics.median(t[0] for t in ts[1:])
        result[name] = statistics.median(t[1] for t in ts[1:])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, training steps and repeats")
    ap.add_argument("--images", type=int, default=None, help="images attacked (default 200, quick 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--uap-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.images or (64 if args.quick else 200)
    train_steps, repeats = (30, 3) if args.quick else (50, 5)

    t0 = time.perf_counter()
    clf = demo_classifier(train_steps, args.seed)
    x, labels = patterns(n, seed=args.seed + 2)
    with torch.no_grad():
        acc = (clf(x).argmax(1) == labels).float().mean().item()
    print(
        f"small_resnet (32, 64, 128), {CLASSES} classes, {n} images {SIZE}x{SIZE}, threads {args.threads}: "
        f"trained {train_steps} steps in {time.perf_counter() - t0:.1f} s, accuracy {acc:.3f}"
    )

    l2_eps = l2_budget_for_size(2000, SIZE, SIZE)
    rows = [
        (
            "UAP linf 10, 1 pass (fooling rate)",
            "ART",
            UAP_GOAL,
            bench_uap(clf, x, seed=args.seed, batch_size=args.uap_batch_size),
        ),
        (
            "PGD linf 10, 10 steps (success)",
            "torchattacks",
            PGD_GOAL,
            bench_pgd(clf, x, norm="linf", eps=10, repeats=repeats, seed=args.seed),
        ),
        (
            f"PGD l2 {l2_eps:.0f}, 10 steps (success)",
            "torchattacks",
            PGD_GOAL,
            bench_pgd(clf, x, norm="l2", eps=l2_eps, repeats=repeats, seed=args.seed),
        ),
    ]

    head = (
        f"| {'comparison':36s} | {'peer':12s} | {'ours cpu s':>10s} | {'peer cpu s':>10s} | "
        f"{'speed-up':>8s} | {'goal':>5s} | {'status':6s} | {'wall s ours/peer':>16s} | {'wall x':>6s} | "
        f"{'ours rate':>9s} | {'peer rate':>9s} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for what, peer, goal, r in rows:
        speedup = r["peer"] / r["ours"]
        status = "met" if speedup >= goal else "missed"
        walls = f"{r['ours_wall']:.2f}/{r['peer_wall']:.2f}"
        print(
            f"| {what:36s} | {peer:12s} | {r['ours']:10.2f} | {r['peer']:10.2f} | {speedup:7.1f}x | "
            f"{goal:4.0f}x | {status:6s} | {walls:>16s} | {r['peer_wall'] / r['ours_wall']:5.1f}x | "
            f"{r['ours_rate']:9.3f} | {r['peer_rate']:9.3f} |"
        )


if __name__ == "__main__":
    main()
