"""Shared pieces of the benchmarks: the demo setting, the peers' wrappers, timing, tables, results.

Not part of the library (tests never import it). Every ``bench_*.py`` module exposes
``run(quick: bool, out_dir: Path) -> dict`` (``{"name", "title", "setting", "rows", "goals"}``, printed
as it goes) and a ``main()`` for running it alone; ``run_all.py`` runs them in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# -- the setting ---------------------------------------------------------------------------------------
def setup_threads(threads: int = 1) -> None:
    """One torch thread by default: ratios on a shared 2-core machine are then far steadier."""
    torch.set_num_threads(threads)


def machine() -> Dict[str, Any]:
    """What ran the benchmarks: CPU model and count, threads, load, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def demo_data(n_train: int = 300, n_test: int = 300, seed: int = 0):
    """The demo classifier and the demo's attack images (:func:`juap.commands.demo.attack_split`).

    Returns:
        ``(clf, x_train (n_train, 3, 64, 64), x_test (n_test, ...), y_test, info)``; the classifier is
        trained once (a few minutes) and cached in ``$JUAP_CACHE/demo``.
    """
    from juap.commands.demo import attack_split
    from juap.commands.demo_models import cached_demo_classifier
    from juap.commands.train_classifier import TrainClassifierConfig

    t0 = time.perf_counter()
    clf, splits, metrics, cached = cached_demo_classifier(TrainClassifierConfig(), progress=False)
    split = attack_split(splits.test, n_train=n_train, n_test=n_test, seed=seed)
    info = {
        "classifier": f"demo {clf.arch} ({'cached' if cached else 'trained now'})",
        "test_accuracy": metrics.get("test_accuracy"),
        "seconds_to_load": round(time.perf_counter() - t0, 1),
    }
    return clf.eval(), split.x_train, split.x_test, split.y_test, info


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters need no gradient (as juap's attacks do): no method pays for weight gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def art_classifier(clf, input_shape: Sequence[int]):
    """ART's ``PyTorchClassifier`` around a juap classifier (images in [0, 1], normalisation inside)."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=clf,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=clf.num_classes,
        clip_values=(0.0, 1.0),
    )


# -- timing --------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """``(wall seconds, process CPU seconds, result)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleaved(
    fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, clock: str = "cpu"
) -> Dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds so load drifts hit all alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            wall, cpu, _ = timed(fn)
            if i >= warmup:
                times[name].append(cpu if clock == "cpu" else wall)
    return {k: statistics.median(v) for k, v in times.items()}


# -- reporting -----------------------------------------------------------------------------------------
def goal(
    name: str, value: Optional[float], target: float, *, higher_is_better: bool, unit: str = "x"
) -> Dict:
    """One goal's verdict: met / missed (``value`` None: not measurable, reported as missed)."""
    if value is None:
        met = False
    else:
        met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return {"goal": name, "value": value, "target": f"{sign} {target:g}{unit}", "met": bool(met)}


def print_table(rows: Iterable[Dict[str, Any]], columns: Sequence[str], *, floatfmt: str = ".3g") -> None:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``."""
    rows = list(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def print_goals(goals: Sequence[Dict[str, Any]]) -> None:
    for g in goals:
        v = g["value"]
        vs = "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"  GOAL {g['goal']}: {vs} (goal {g['target']}) -> {'MET' if g['met'] else 'MISSED'}")
    sys.stdout.flush()


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return str(v)


def standalone(run: Callable[[bool, Path], Dict[str, Any]], doc: str) -> None:
    """``main()`` of a bench module run alone: ``[--quick] [--threads N] [--out DIR]``, JSON written."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    args = ap.parse_args()
    setup_threads(args.threads)
    print(json.dumps(machine()))
    res = run(args.quick, args.out)
    write_json(args.out / f"{res['name']}.json", {"machine": machine(), **res})
    print(f"wrote {args.out / (res['name'] + '.json')}")
