"""The baselines against their reference implementations: one UAP pass vs ART's, and PGD vs torchattacks.

    python benchmarks/bench_baselines.py [--quick] [--threads N] [--out DIR]

* UAP: one pass of :class:`juap.attacks.uap.UAP` vs ART's ``UniversalPerturbation(attacker="deepfool")``
  over the same held-out demo images, same budget (L_inf 10), same DeepFool settings (overshoot 0.02,
  10 iterations, 10 class gradients), with both fooling rates (ART's formula, on the images attacked).
  Goal: ours >= 20x faster per pass. (``bench_time_to_fool.py`` times passes inside the race to 70%.)
* PGD: ``bench_pgd.py`` (ours vs torchattacks, L_inf and L_2).

Process CPU time with one torch thread (a shared machine's load disturbs it far less than wall time).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np

import bench_pgd
from _common import art_classifier, demo_data, goal, print_goals, print_table, standalone, timed
from juap.attacks.uap import UAP

UAP_GOAL = 20.0


def uap_pass(clf, x, *, eps: float = 10.0, seed: int = 0, batch_size: int = 8, fast: bool = True) -> Dict:
    """CPU and wall seconds of one pass of ours and of ART's DeepFool UAP, and their fooling rates."""
    from art.attacks.evasion import UniversalPerturbation

    ours = UAP(
        classifier=clf, norm="linf", eps=eps, max_passes=1, target_fooling_rate=1.0, overshoot=0.02,
        deepfool_steps=10, nb_grads=10, batch_size=batch_size, seed=seed, fast=fast,
    )  # fmt: skip
    theirs = UniversalPerturbation(
        art_classifier(clf, x.shape[1:]), attacker="deepfool", delta=0.0, max_iter=1, eps=eps / 255,
        norm=np.inf, verbose=False,
        attacker_params={"epsilon": 0.02, "max_iter": 10, "nb_grads": 10, "verbose": False},
    )  # fmt: skip
    ours_wall, ours_cpu, _ = timed(lambda: ours.fit(x, progress=False))
    random.seed(seed)  # ART shuffles with Python's random
    x_np = x.numpy()
    peer_wall, peer_cpu, _ = timed(lambda: theirs.generate(x_np))
    return {
        "ours_cpu": ours_cpu, "peer_cpu": peer_cpu, "ours_wall": ours_wall, "peer_wall": peer_wall,
        "ours_rate": ours.fooling_rate_, "peer_rate": theirs.fooling_rate,
    }  # fmt: skip


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    clf, _, x, _, info = demo_data(0, 64 if quick else 200)
    r = uap_pass(clf, x)
    rows = [
        {
            "comparison": "UAP linf 10, 1 pass",
            "peer": "ART",
            "ours cpu s": r["ours_cpu"],
            "peer cpu s": r["peer_cpu"],
            "speed-up": r["peer_cpu"] / r["ours_cpu"],
            "wall ours/peer": f"{r['ours_wall']:.2f}/{r['peer_wall']:.2f}",
            "ours rate": r["ours_rate"],
            "peer rate": r["peer_rate"],
        }
    ]
    print_table(rows, list(rows[0]))
    goals = [goal("UAP one pass vs ART's", rows[0]["speed-up"], UAP_GOAL, higher_is_better=True)]
    print_goals(goals)
    pgd = bench_pgd.run(quick, out_dir)
    return {
        "name": "baselines",
        "title": "UAP one pass vs ART; PGD vs torchattacks",
        "setting": {**info, "images": len(x)},
        "rows": rows + pgd["rows"],
        "goals": goals + pgd["goals"],
    }


if __name__ == "__main__":
    standalone(run, __doc__)
