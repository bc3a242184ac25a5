"""How cost grows, and memory: JUAP-Grad-CAM step time and peak memory against batch size and resolution.

    python benchmarks/bench_scaling.py [--quick] [--threads N] [--out DIR]      # item 5: the sweep + plot
    python benchmarks/bench_memory.py [--quick] [--threads N] [--out DIR]       # item 6: 224x224, batch 30

Every point runs in a fresh child process (one torch thread), so its peak resident set size
(``VmHWM``) is its own: the child builds the classifier (random weights, 1000 classes), a JUAP
attack against Grad-CAM (the smoothed-ReLU surrogate, the default ResNet generator) and random images,
then runs training steps (the first one a warm-up). Reported: CPU seconds per step, the RSS before the
first step (the libraries, the models), the peak RSS, and their difference (what the step needs).

Linearity: least-squares fits of step time and step memory against batch size (at 64x64) and against
the pixel count (at batch 8), with R^2; from them, the batch size at which the peak reaches 24 GiB at
64x64 and at 224x224 (CPU RSS; on a GPU the activations dominate the same way, plus the CUDA context).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

GIB = 1024**3
BENCH_DIR = Path(__file__).resolve().parent


# -- the child -----------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The peak RSS of this process's address space (``VmHWM``). Not ``ru_maxrss``: Linux keeps that
    across ``execve``, so a child forked from a large parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run JUAP-Grad-CAM steps (``mode="step"``) or a short ``fit`` (``mode="fit"``) and measure."""
    import torch

    import juap
    from juap.attacks.base import rebind
    from juap.interpreters.smooth_relu import make_surrogate

    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(0)
    clf = juap.create_classifier(spec["arch"])
    b, s = spec["batch"], spec["size"]
    x = torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))
    interp = juap.create_interpreter("gradcam", clf)

    def make_attack(batch: int):
        return juap.create_attack(
            "juap",
            classifier=clf,
            interpreter=interp,
            norm="linf",
            eps=10,
            batch_size=batch,
            steps=spec["steps"],
            eval_every=spec["steps"],
            seed=0,
        )

    def steps(attack, x: torch.Tensor, n: int) -> List[float]:
        G = attack.make_generator().train()
        attack.noise = torch.rand((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.Adam(G.parameters(), lr=attack.lr, betas=attack.betas)
        surrogate = rebind(interp, make_surrogate(clf))
        times = []
        for _ in range(n):
            t0 = time.process_time()
            attack.train_step(G, opt, x, surrogate)
            times.append(time.process_time() - t0)
        return times

    # A one-image step at 32x32 first: the code pages and allocator pools every step touches are then
    # in the baseline, so the difference is what this batch and resolution need.
    steps(make_attack(1), torch.rand(1, 3, 32, 32), 1)
    attack = make_attack(b)
    rss0 = _rss_bytes()
    times: List[float] = []
    if spec["mode"] == "fit":  # the real loop: steps, then the validation on held-out images
        t0 = time.process_time()
        attack.fit(x, val_data=x, progress=False)
        times.append((time.process_time() - t0) / spec["steps"])
    else:
        times = steps(attack, x, spec["steps"])
        times = times[1:] or times  # the first step warms up
    peak = _peak_rss_bytes()
    return {
        **spec,
        "step_cpu_s": sorted(times)[len(times) // 2],
        "rss_before_gib": rss0 / GIB,
        "peak_rss_gib": peak / GIB,
        "step_gib": (peak - rss0) / GIB,
    }


# What a measured point reports, in table order.
POINT_COLUMNS = ("arch", "batch", "size", "step_cpu_s", "rss_before_gib", "peak_rss_gib", "step_gib", "error")


def measure(spec: Dict[str, Any], timeout: float = 600) -> Dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; its JSON line is the result (or an error)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    cmd = [sys.executable, str(BENCH_DIR / "bench_scaling.py"), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:g} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {
            **spec,
            "error": f"exit {p.returncode} ({'killed: out of memory?' if p.returncode < 0 else tail[0]})",
        }
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 1)
    return out


# -- fits and the plot ---------------------------------------------------------------------------------
def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
    """Least squares y = a + b x -> (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def plot(points: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for arch in sorted({p["arch"] for p in points}):
        for col, (sweep, key, label) in enumerate(
            (("batch", "batch", "batch size (64x64)"), ("size", "size", "resolution (batch 8)"))
        ):
            ps = sorted(
                (p for p in points if p["arch"] == arch and p["sweep"] == sweep and "error" not in p),
                key=lambda p: p[key],
            )
            xs = [p[key] for p in ps]
            axes[0, col].plot(xs, [p["step_cpu_s"] for p in ps], "o-", label=arch)
            axes[1, col].plot(xs, [p["peak_rss_gib"] for p in ps], "o-", label=arch)
            axes[0, col].set_xlabel(label)
            axes[1, col].set_xlabel(label)
    axes[0, 0].set_ylabel("JUAP-Grad-CAM step, CPU s")
    axes[1, 0].set_ylabel("peak RSS, GiB")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("How cost grows (1 CPU thread)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    from _common import print_table

    archs = ("resnet18", "densenet121")
    batches = (1, 4, 16) if quick else (1, 4, 16, 64)
    sizes = (64, 128) if quick else (64, 128, 224)
    specs = [
        {"arch": a, "sweep": "batch", "batch": b, "size": 64, "steps": 3, "mode": "step"}
        for a in archs
        for b in batches
    ]
    specs += [
        {"arch": a, "sweep": "size", "batch": 8, "size": s, "steps": 3, "mode": "step"}
        for a in archs
        for s in sizes
    ]
    for spec in specs:  # the heaviest points: one warm-up and one timed step
        if spec["batch"] * spec["size"] ** 2 >= 8 * 224**2 or spec["batch"] >= 64:
            spec["steps"] = 2
    print(f"[scaling] JUAP-Grad-CAM steps, {len(specs)} child processes, 1 thread each", flush=True)
    points = []
    for spec in specs:
        points.append(measure(spec))
        p = points[-1]
        print(
            f"  {p['arch']} b{p['batch']} {p['size']}x{p['size']}: "
            + (
                p["error"]
                if "error" in p
                else f"{p['step_cpu_s']:.3f} s/step, peak {p['peak_rss_gib']:.2f} GiB (+{p['step_gib']:.2f})"
            ),
            flush=True,
        )
    rows = [{k: p.get(k) for k in POINT_COLUMNS} for p in points]
    print_table(rows, ["arch", "batch", "size", "step_cpu_s", "rss_before_gib", "peak_rss_gib", "step_gib"])
    fits: Dict[str, Any] = {}
    for arch in archs:
        pb = [p for p in points if p["arch"] == arch and p["sweep"] == "batch" and "error" not in p]
        ps = [p for p in points if p["arch"] == arch and p["sweep"] == "size" and "error" not in p]
        f: Dict[str, Any] = {}
        if len(pb) >= 2:
            f["time_vs_batch"] = linear_fit([p["batch"] for p in pb], [p["step_cpu_s"] for p in pb])
            f["mem_vs_batch"] = linear_fit([p["batch"] for p in pb], [p["peak_rss_gib"] for p in pb])
        if len(ps) >= 2:
            f["time_vs_pixels"] = linear_fit([p["size"] ** 2 for p in ps], [p["step_cpu_s"] for p in ps])
            f["mem_vs_pixels"] = linear_fit([p["size"] ** 2 for p in ps], [p["peak_rss_gib"] for p in ps])
        if "mem_vs_batch" in f:
            a, b, _ = f["mem_vs_batch"]
            f["batch_at_24gib_64px"] = int((24 - a) / b) if b > 0 else None
        if "mem_vs_pixels" in f and "mem_vs_batch" in f:
            # per-image memory at 224 from the resolution sweep (batch 8), fixed part from the batch sweep
            a_s, b_s, _ = f["mem_vs_pixels"]
            per_image_224 = (a_s + b_s * 224**2 - f["mem_vs_batch"][0]) / 8
            f["gib_per_image_224"] = per_image_224
            f["batch_at_24gib_224px"] = (
                int((24 - f["mem_vs_batch"][0]) / per_image_224) if per_image_224 > 0 else None
            )
        fits[arch] = f
        desc = []
        for key in ("time_vs_batch", "mem_vs_batch", "time_vs_pixels", "mem_vs_pixels"):
            if key in f:
                a, b, r2 = f[key]
                desc.append(f"{key}: {a:.3g} + {b:.3g}*x (R^2 {r2:.3f})")
        print(f"  {arch}: " + "; ".join(desc))
        print(
            f"  {arch}: peak reaches 24 GiB at batch ~{f.get('batch_at_24gib_64px')} at 64x64, "
            f"~{f.get('batch_at_24gib_224px')} at 224x224 "
            f"({f.get('gib_per_image_224', float('nan')):.3f} GiB per image at 224)",
            flush=True,
        )
    png = out_dir / "scaling.png"
    plot(points, png)
    print(f"  plot: {png}")
    return {
        "name": "scaling",
        "title": "5. How cost grows: step time and peak memory vs batch size and resolution",
        "setting": {
            "archs": archs,
            "batches_at_64": batches,
            "sizes_at_batch_8": sizes,
            "interpreter": "gradcam",
        },
        "rows": rows,
        "fits": fits,
        "plot": str(png),
        "goals": [],
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path.insert(0, str(BENCH_DIR))
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        from _common import standalone

        standalone(run, __doc__)
