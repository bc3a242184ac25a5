"""Does the embedded recipe carry over to data nobody tuned it on? (issue 23, item 3)

The data: scikit-learn's handwritten digits (1797 8x8 grayscale images, 10 classes, shipped inside the
package), upscaled to 32x32 RGB and written as an image folder. The first 60% of each class train the
classifier (``juap train-classifier``) and its RTS model (``juap train-rts``); the other 40% are the
attack images (45% of them to learn a perturbation, 45% to measure it). Then the grid of the embedded
recipe (``configs/embedded/_base.yaml``: GUAP, R-JUAP, SGD-UAP as the plain strong reference) at the
paper's per-pixel budgets (L_inf 10, L_2 2000 * 32 / 224 = 286) and at 2.4x (L_inf 24, L_2 686), and the
levers (the constrained mode, a larger lambda, the map term on fooled images) at 2.4x.

    python benchmarks/bench_carryover.py [--out benchmarks/results/carryover] [--work /tmp/juap-digits]

Prints the tables (``results.md`` of each grid) and copies their CSVs into ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "src" / "juap" / "configs" / "embedded" / "_base.yaml"
BUDGETS = {
    "paper": [{"norm": "linf", "eps": 10}, {"norm": "l2", "eps": 286}],
    "2.4x": [{"norm": "linf", "eps": 24}, {"norm": "l2", "eps": 686}],
}
LEVERS = [{"fr_margin": 0.05, "warmup": 100}, {"lam": 0.5}, {"map_on": "fooled", "lam": 1.0}]


def write_digits(folder: Path) -> None:
    """The digits as PNGs, ``clf/<class>/`` (first 60% of each class) and ``attack/<class>/`` (the rest)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        cut = int(len(idx) * 0.6)
        for part, chosen in (("clf", idx[:cut]), ("attack", idx[cut:])):
            (folder / part / str(c)).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                img = Image.fromarray((digits.images[i] / 16.0 * 255).astype(np.uint8), mode="L")
                img.resize((32, 32), Image.BILINEAR).convert("RGB").save(
                    folder / part / str(c) / f"{i:04d}.png"
                )


def juap(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "juap", *args, "--no-progress"], check=True)


def dump(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "carryover"))
    ap.add_argument("--work", default="/tmp/juap-digits")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    if not (work / "attack").is_dir():
        write_digits(work)
    data = {"name": "folder", "root": str(work / "clf"), "image_size": 32}
    clf_run, rts_run = work / "clf-run", work / "rts-run"
    if not (clf_run / "classifier.safetensors").is_file():
        spec = {
            "data": {**data, "train_fraction": 0.8, "test_fraction": 0.2, "in_memory": True},
            "classifier": {"name": "small_resnet", "num_classes": 10},
            "train": {"epochs": 30, "batch_size": 64, "lr": 0.05},
            "seed": 0,
        }
        juap(
            "train-classifier",
            "--config",
            str(dump(work / "train.yaml", spec)),
            "--out",
            str(clf_run),
            "--overwrite",
        )
    if not (rts_run / "rts.safetensors").is_file():
        spec = {
            "data": {**data, "train_fraction": 0.8, "test_fraction": 0.2},
            "classifier": {"name": "small_resnet", "weights": str(clf_run / "classifier.safetensors")},
            "train": {"epochs": 10, "batch_size": 64},
            "seed": 0,
        }
        juap(
            "train-rts", "--config", str(dump(work / "rts.yaml", spec)), "--out", str(rts_run), "--overwrite"
        )
    classifier = {
        "name": "small_resnet",
        "label": "digits-small_resnet",
        "weights": str(clf_run / "classifier.safetensors"),
        "checkpoints": {"rts": str(rts_run / "rts.safetensors")},
    }
    common = {
        "extends": str(BASE),
        "data": {**data, "root": str(work / "attack"), "train_fraction": 0.45, "test_fraction": 0.45},
    }
    table = [
        {
            "title": "digits",
            "rows": ["budget", "variant"],
            "columns": ["interpreter"],
            "values": ["fooling_ratio", "iou", "iou_fooled", "l1"],
        }
    ]
    grids = {
        "carryover": {"attacks": ["sgd_uap", "guap", "juap"], "budgets": BUDGETS["paper"] + BUDGETS["2.4x"]},
        "levers": {"attacks": ["juap"], "budgets": BUDGETS["2.4x"], "variants": LEVERS},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, grid in grids.items():
        spec = {
            **common,
            "name": f"digits-{name}",
            "description": f"the embedded recipe on the digits: {name}",
            "grid": {
                "classifiers": [classifier],
                "generators": ["resnet"],
                "interpreters": ["cam", "gradcam", "rts"],
                **grid,
            },
            "tables": table,
        }
        juap("run", str(dump(work / f"{name}.yaml", spec)), "--out", str(work / name))
        for f in ("results.csv", "results.md"):
            shutil.copy(work / name / f, out / f"{name}-{f}")
        print((work / name / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
