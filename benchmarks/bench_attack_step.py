"""Cost of one JUAP training step (CAM, Grad-CAM, RTS) as a ratio to one GUAP step, side by side.

    python benchmarks/bench_attack_step.py [--quick] [--threads N] [--size 64] [--batch 30]

Goals (issue 4): CAM and Grad-CAM at most 1.5x a GUAP step, RTS at most 2.5x. Every step is timed on
the same classifier, generator, noise and images in one run; medians of several repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import juap
from juap.attacks.base import rebind
from juap.interpreters.smooth_relu import make_surrogate


def time_steps(attack, x, repeats: int) -> float:
    G = attack._make_generator().train()
    attack.noise = torch.rand((1,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(G.parameters(), lr=attack.lr, betas=attack.betas)
    interp = attack.interpreter
    if interp is not None and attack.use_surrogate:
        interp = rebind(interp, make_surrogate(attack.classifier))
    attack._step(G, opt, x, interp)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        attack._step(G, opt, x, interp)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _untrained_rts(clf) -> str:
    """An untrained RTS saved to a temporary file: its step costs the same as a trained one's."""
    import tempfile

    from juap.interpreters.rts import save_rts

    path = tempfile.mkdtemp() + "/rts.safetensors"
    save_rts(juap.create_interpreter("rts", clf), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--rts", help="an RTS checkpoint for the classifier (else an untrained RTS is timed)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    clf = juap.create_classifier("small_resnet", num_classes=6)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    common = dict(classifier=clf, norm="linf", eps=10, batch_size=args.batch, generator_options={"ngf": 32})
    rows = [("guap", None)]
    for name in ("cam", "gradcam", "rts"):
        if name in juap.list_interpreters():
            rows.append(("juap", name))
    results = {}
    for attack_name, interp_name in rows:
        kw = dict(common)
        if interp_name == "rts":
            kw["interpreter"] = juap.create_interpreter(
                "rts", clf, checkpoint=args.rts or _untrained_rts(clf)
            )
        elif interp_name:
            kw["interpreter"] = juap.create_interpreter(interp_name, clf)
        attack = juap.create_attack(attack_name, **kw)
        results[(attack_name, interp_name)] = time_steps(attack, x, repeats)
    base = results[("guap", None)]
    goals = {"cam": 1.5, "gradcam": 1.5, "rts": 2.5}
    print(
        f"small_resnet, {args.size}x{args.size}, batch {args.batch}, ResNet generator ngf 32, "
        f"{torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"{'step':<18}{'seconds':>10}{'x GUAP':>10}{'goal':>8}  verdict")
    for (a, i), t in results.items():
        label = a if i is None else f"{a}-{i}"
        ratio = t / base
        goal = goals.get(i)
        verdict = "" if goal is None else ("met" if ratio <= goal else "missed")
        goal_s = "" if goal is None else f"<={goal}"
        print(f"{label:<18}{t:>10.3f}{ratio:>10.2f}{goal_s:>8}  {verdict}")


if __name__ == "__main__":
    main()
