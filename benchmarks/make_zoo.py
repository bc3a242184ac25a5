"""Add a finished run's perturbation to the package's zoo (``src/juap/zoo/NAME.png``; ``juap zoo`` lists it).

Reads a run folder of ``juap attack`` (or a cell of ``juap run`` / a benchmark): its float perturbation,
its metadata and its ``config.yaml``, and writes the exact 8-bit PNG with the full provenance, the
images it was measured on (``data``) and the classifier's weights name added where the run predates
them, and a one-line description.

    python benchmarks/make_zoo.py RUN_DIR NAME --description "GUAP, seed 0, ..."
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from juap.app.artifacts import load_perturbation, read_perturbation_metadata, save_perturbation
from juap.commands.attack import DATA_UNRECORDED, is_weights_name
from juap.commands.zoo import ZOO_DIR


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name", help="the entry's name, e.g. lite0-128-guap-linf10")
    ap.add_argument("--description", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    target = ZOO_DIR / f"{args.name}.png"
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{target} exists; --overwrite to replace it")
    meta = read_perturbation_metadata(args.run_dir / "perturbation.safetensors")
    cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    n_hat = load_perturbation(args.run_dir / "perturbation.safetensors")
    provenance = {k: v for k, v in meta.items() if k not in ("format", "attack", "norm", "eps", "shape")}
    provenance.setdefault("data", {k: v for k, v in cfg["data"].items() if k not in DATA_UNRECORDED})
    if is_weights_name(cfg["classifier"].get("weights")):
        provenance.setdefault("classifier_weights", cfg["classifier"]["weights"])
    provenance["description"] = args.description
    with tempfile.TemporaryDirectory() as tmp:
        stem = Path(tmp) / args.name
        save_perturbation(
            stem, n_hat, attack=meta["attack"], norm=meta["norm"], eps=meta["eps"], provenance=provenance
        )
        written = read_perturbation_metadata(stem.with_suffix(".png"))
        if not written.get("exact"):
            raise SystemExit(f"{args.run_dir}: the perturbation does not fit 8 bits exactly; not a zoo entry")
        ZOO_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stem.with_suffix(".png"), target)
    print(f"Wrote {target} ({target.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
