"""PGD: ours vs torchattacks at the same settings, on the demo classifier and its held-out images.

    python benchmarks/bench_pgd.py [--quick] [--threads N] [--out DIR]

:class:`juap.attacks.pgd.PGD` vs torchattacks' ``PGD`` (L_inf 10) and ``PGDL2`` (L_2 2000 at 224x224,
scaled to 64x64 by :func:`juap.budget.l2_budget_for_size`): 10 steps of 2.5 * eps / 10, a random start
from the same seed, the benign predictions as labels, the same frozen classifier. Medians of interleaved
repeats (process CPU time, one torch thread), with both success rates (prediction changed).
Goal: ours no slower (speed-up >= 1) at the same success rate (within 2 points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from _common import demo_data, goal, print_goals, print_table, standalone, timed
from juap.attacks.pgd import PGD
from juap.budget import l2_budget_for_size

SPEED_GOAL, RATE_TOLERANCE = 1.0, 0.02


def compare(clf, x: torch.Tensor, *, norm: str, eps: float, repeats: int, seed: int = 0) -> Dict[str, float]:
    """Median CPU and wall seconds and success rates of ours and torchattacks' PGD on ``x``."""
    import statistics

    import torchattacks

    with torch.no_grad():
        y = clf(x).argmax(1)
    steps, step = 10, 2.5 * eps / 10
    ours = PGD(
        classifier=clf, norm=norm, eps=eps, steps=steps, step_size=step, random_start=True, use_labels=True
    )
    peer_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = peer_cls(clf, eps=eps / 255, alpha=step / 255, steps=steps, random_start=True)
    times: Dict[str, List[tuple]] = {"ours": [], "peer": []}
    rates: Dict[str, float] = {}
    for i in range(repeats + 1):  # the first round warms up
        for name, attack in (("ours", ours), ("peer", theirs)):  # interleaved
            torch.manual_seed(seed)  # the same random start for both
            wall, cpu, x_adv = timed(lambda attack=attack: attack(x, y))
            if i:
                times[name].append((wall, cpu))
            with torch.no_grad():
                rates[name] = float((clf(x_adv).argmax(1) != y).float().mean())
    out = {f"{k}_rate": v for k, v in rates.items()}
    for name, ts in times.items():
        out[f"{name}_cpu"] = statistics.median(t[1] for t in ts)
        out[f"{name}_wall"] = statistics.median(t[0] for t in ts)
    return out


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    n, repeats = (64, 2) if quick else (200, 3)
    clf, _, x, _, info = demo_data(0, n)
    l2_eps = l2_budget_for_size(2000, 64, 64)
    print(
        f"[pgd] {info['classifier']}, {len(x)} held-out images 64x64, 10 steps, median of {repeats}",
        flush=True,
    )
    rows, goals = [], []
    for norm, eps in (("linf", 10.0), ("l2", l2_eps)):
        r = compare(clf, x, norm=norm, eps=eps, repeats=repeats)
        su = r["peer_cpu"] / r["ours_cpu"]
        rows.append(
            {
                "setting": f"{norm} {eps:.0f}",
                "ours cpu s": r["ours_cpu"],
                "torchattacks cpu s": r["peer_cpu"],
                "speed-up": su,
                "wall ours/peer": f"{r['ours_wall']:.2f}/{r['peer_wall']:.2f}",
                "ours success": r["ours_rate"],
                "torchattacks success": r["peer_rate"],
            }
        )
        goals.append(
            goal(
                f"PGD {norm} {eps:.0f}: ours no slower than torchattacks",
                su,
                SPEED_GOAL,
                higher_is_better=True,
            )
        )
        goals.append(
            goal(
                f"PGD {norm} {eps:.0f}: success within 2 points of torchattacks' (ours - theirs)",
                r["ours_rate"] - r["peer_rate"],
                -RATE_TOLERANCE,
                higher_is_better=True,
                unit="",
            )
        )
    print_table(rows, list(rows[0]))
    print_goals(goals)
    return {
        "name": "pgd",
        "title": "3. PGD: ours vs torchattacks",
        "setting": {**info, "images": len(x), "repeats": repeats},
        "rows": rows,
        "goals": goals,
    }


if __name__ == "__main__":
    standalone(run, __doc__)
