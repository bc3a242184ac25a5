"""Memory: peak RSS of JUAP-Grad-CAM training at 224x224, batch 30, ResNet18 and DenseNet121, on CPU.

    python benchmarks/bench_memory.py [--quick] [--threads N] [--out DIR]

Each model runs ``JUAP.fit`` (2 Adam steps of the default ResNet generator, then the validation pass
over the images) in a fresh child process (see ``bench_scaling.py``), whose ``VmHWM`` is the peak.
Goal: under 8 GiB. What keeps it there: the benign logits and maps are computed under ``torch.no_grad()``
(no graph kept for them), Grad-CAM at the CAM layer differentiates only the linear head (its
``create_graph=True`` graph is (N, K) weights, not a second copy of the network's activations), the
classifier's parameters are frozen (no weight gradients), and each step's graph is freed by its
``backward()`` before the next batch. The single largest item is the adversarial forward's saved
activations (the graph the backward needs), linear in the batch size (``bench_scaling.py``).
``--quick`` runs batch 8 instead of 30.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from _common import goal, print_goals, print_table, standalone
from bench_scaling import POINT_COLUMNS, measure

COLUMNS = POINT_COLUMNS[:-1] + ("wall_s", "error")

GOAL_GIB = 8.0


def run(quick: bool, out_dir: Path) -> Dict[str, Any]:
    batch = 8 if quick else 30
    rows, goals = [], []
    print(
        f"[memory] JUAP-Grad-CAM fit (2 steps + validation), 224x224, batch {batch}, child processes",
        flush=True,
    )
    for arch in ("resnet18", "densenet121"):
        r = measure({"arch": arch, "batch": batch, "size": 224, "steps": 2, "mode": "fit"}, timeout=900)
        rows.append({k: r.get(k) for k in COLUMNS})
        goals.append(
            goal(
                f"{arch} 224x224 batch {batch}: peak RSS of JUAP-Grad-CAM training",
                r.get("peak_rss_gib"),
                GOAL_GIB,
                higher_is_better=False,
                unit=" GiB",
            )
        )
    print_table(rows, list(COLUMNS))
    print_goals(goals)
    return {
        "name": "memory",
        "title": "6. Memory: peak RSS of JUAP-Grad-CAM training, 224x224, batch 30, CPU",
        "setting": {"batch": batch, "size": 224, "steps": 2, "generator": "resnet (default ngf)"},
        "rows": rows,
        "goals": goals,
    }


if __name__ == "__main__":
    standalone(run, __doc__)
