"""Make the demo's package data in ``src/juap/weights/demo/`` (how: that folder's README.md).

    python benchmarks/make_demo_data.py models        # train the demo models with the documented commands
    python benchmarks/make_demo_data.py models --runs CLF_RUN RTS_RUN   # or take two finished runs
    python benchmarks/make_demo_data.py spread        # the claims benchmark's 3-seed sd of each JUAP cell

``models`` runs ``juap train-classifier`` and ``juap train-rts`` with the demo's configs (the defaults,
and ``train.epochs`` = juap.commands.demo_models.RTS_EPOCHS for RTS), copies the two weight files into
the package and writes ``manifest.json``: per model its file, sha256, size, the config key the demo
matches it by, the command line that made it and its training metrics. ``spread`` reads
``benchmarks/results/claims/claims.json`` (``bench_claims.py``) and writes ``headline_spread.json``: the
mean and 3-seed sd of FR, IoU and L1 of every JUAP cell, which ``juap demo`` prints beside its verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from juap.commands.demo_models import (  # noqa: E402
    RTS_EPOCHS,
    SHIPPED_DIR,
    classifier_key,
    rts_key,
    sha256_of,
)
from juap.commands.train_classifier import TrainClassifierConfig  # noqa: E402

CLAIMS = ROOT / "benchmarks" / "results" / "claims" / "claims.json"
SPREAD_KEYS = ("fooling_ratio", "fooling_ratio_sd", "iou", "iou_sd", "l1", "l1_sd")
KEPT_METRICS = {
    "classifier": ("test_accuracy", "test_images", "train_seconds", "epochs"),
    "rts": ("pointing_top20", "mean_mask_area", "test_images", "train_seconds", "epochs"),
}


def commands(work: Path) -> Dict[str, List[str]]:
    """The documented command lines that train the demo models into ``work``."""
    clf = work / "classifier"
    return {
        "classifier": ["juap", "train-classifier", "--out", str(clf)],
        "rts": [
            "juap",
            "train-rts",
            "--set",
            f"classifier.weights={clf / 'classifier.safetensors'}",
            "--set",
            f"train.epochs={RTS_EPOCHS}",
            "--out",
            str(work / "rts"),
        ],
    }


def train(work: Path) -> Dict[str, Path]:
    """Run :func:`commands` (with this interpreter and this checkout's package); returns the run folders."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for argv in commands(work).values():
        print(" ".join(argv), flush=True)
        subprocess.run([sys.executable, "-m", *argv, "--no-progress"], check=True, env=env)
    return {"classifier": work / "classifier", "rts": work / "rts"}


def write_models(runs: Dict[str, Path], out: Path = SHIPPED_DIR, commit: str = "") -> Dict:
    """Copy the two runs' weights into ``out`` and write ``manifest.json`` (``commit``: the code that trained
    them, default this checkout's); returns the manifest."""
    ccfg = TrainClassifierConfig()
    keys = {"classifier": classifier_key(ccfg), "rts": rts_key(ccfg, RTS_EPOCHS)}
    sources = {"classifier": "classifier.safetensors", "rts": "rts.safetensors"}
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for kind, run in runs.items():
        target = out / sources[kind]
        shutil.copyfile(run / sources[kind], target)
        metrics = json.loads((run / "metrics.json").read_text())
        models[kind] = {
            "file": target.name,
            "sha256": sha256_of(target),
            "bytes": target.stat().st_size,
            "key": keys[kind],
            "command": " ".join(commands(Path("OUT"))[kind]),
            "metrics": {k: metrics[k] for k in KEPT_METRICS[kind] if k in metrics},
        }
    manifest = {
        "format": "juap.demo_models/1",
        "about": "the demo classifier and its RTS model, trained by the commands below with the defaults; "
        "juap.commands.demo_models loads them when the demo's config key matches and checks the sha256",
        "remake": "python benchmarks/make_demo_data.py models (see README.md)",
        "made_on": {
            "commit": commit or _commit(),
            "cpu": _cpu(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "models": models,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def spread(claims: Path = CLAIMS, out: Path = SHIPPED_DIR / "headline_spread.json") -> Dict[str, Any]:
    """``headline_spread.json`` from the claims benchmark's ``claims.json``: every JUAP cell's mean and
    3-seed sd of FR, IoU and L1, by variant and budget."""
    data = json.loads(claims.read_text())
    cells = [
        {"variant": r["variant"], "budget": r["budget"], **{k: r[k] for k in SPREAD_KEYS}}
        for r in data["headline"]
        if r["method"].endswith("JUAP")
    ]
    result = {
        "about": "the claims benchmark's mean and sd over its seeds of each JUAP cell; made by "
        "python benchmarks/make_demo_data.py spread from benchmarks/results/claims/claims.json",
        "seeds": data["seeds"],
        "cells": cells,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine()
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("models", help="train the demo models and write them with manifest.json")
    m.add_argument("--runs", nargs=2, type=Path, metavar=("CLASSIFIER_RUN", "RTS_RUN"))
    m.add_argument("--work", type=Path, help="where to train (default: a temporary folder)")
    m.add_argument("--commit", default="", help="the commit that trained --runs (default: this checkout's)")
    sub.add_parser("spread", help="headline_spread.json from the claims benchmark")
    args = ap.parse_args(argv)
    if args.what == "spread":
        print(f"{len(spread()['cells'])} cells written to {SHIPPED_DIR / 'headline_spread.json'}")
        return 0
    if args.runs:
        runs = {"classifier": args.runs[0], "rts": args.runs[1]}
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="juap-demo-models-"))
        runs = train(work)
    manifest = write_models(runs, commit=args.commit)
    for kind, entry in manifest["models"].items():
        print(f"{kind}: {entry['file']} {entry['bytes']} bytes, sha256 {entry['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
