"""The ``juap`` command line: reads a config, builds objects by name, writes a run folder."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Callable, Dict, List

from .errors import JuapError


def _add_common(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="YAML", help="experiment config file (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )
    if out:
        p.add_argument("--out", "-o", metavar="DIR", help="run folder (default: runs/<command>-<time>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from .config import TrainClassifierConfig, load_config
    from .experiments import run_train_classifier
    from .runs import failed_on_error, new_run_dir

    cfg = load_config(TrainClassifierConfig, args.config, args.overrides)
    run_dir = new_run_dir(args.out, command="train-classifier", overwrite=args.overwrite)
    print(
        f"Training {cfg.classifier.name} on {cfg.data.name} data ({cfg.train.epochs} epochs); "
        f"run folder: {run_dir}"
    )
    with failed_on_error(run_dir):
        m = run_train_classifier(cfg, run_dir, progress=not args.no_progress)
    print(
        f"Test top-1 accuracy: {m['test_accuracy']:.2%} on {m['test_images']} images "
        f"(trained in {m['train_seconds']:.0f} s)"
    )
    print(f"Wrote {run_dir}/classifier.safetensors, metrics.json, config.yaml, split.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import TrainClassifierConfig, apply_overrides, from_dict, load_config, to_dict
    from .demo import DemoSettings, run_demo
    from .runs import failed_on_error, finish_run, new_run_dir

    t0 = time.perf_counter()
    demo_over = [o for o in args.overrides if o.startswith("demo.")]
    cfg = load_config(TrainClassifierConfig, args.config, [o for o in args.overrides if o not in demo_over])
    settings = from_dict(DemoSettings, apply_overrides({}, demo_over).get("demo", {}), "demo")
    run_dir = new_run_dir(args.out, command="demo", overwrite=args.overwrite)
    print(
        "juap demo: the paper's experiment on the embedded synthetic data (6 shape classes on cluttered "
        f"backgrounds, {cfg.data.image_size}x{cfg.data.image_size}); run folder: {run_dir}"
    )
    with failed_on_error(run_dir):
        metrics = run_demo(
            run_dir,
            settings=settings,
            classifier_cfg=cfg,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            say=print,
        )
    total = time.perf_counter() - t0
    finish_run(
        run_dir,
        config={"classifier_training": to_dict(cfg), "demo": metrics["settings"]},
        metrics={**metrics, "demo_seconds": round(total, 1)},
    )
    print(f"Done in {total:.0f} s. Results in {run_dir}/:")
    print(
        "  results.md (Tables II-IV), results.csv and transfer.csv, metrics.json, figure.png (Fig. 4 style),"
    )
    print(
        "  discrepancy.png (Fig. 5 style), perturbations/*.png. Run it again to reuse the cached models "
        "and cells."
    )
    return 0


def cmd_train_rts(args: argparse.Namespace) -> int:
    from .config import load_config
    from .rts_training import TrainRTSConfig, run_train_rts
    from .runs import failed_on_error, new_run_dir

    cfg = load_config(TrainRTSConfig, args.config, args.overrides)
    run_dir = new_run_dir(args.out, command="train-rts", overwrite=args.overwrite)
    print(
        f"Training the RTS saliency model for {cfg.classifier.weights} ({cfg.train.epochs} epochs); "
        f"run folder: {run_dir}"
    )
    t0 = time.perf_counter()
    with failed_on_error(run_dir):
        m = run_train_rts(cfg, run_dir, progress=not args.no_progress)
    point = m.get("pointing_top20")
    print(
        f"Done in {time.perf_counter() - t0:.0f} s; mean mask area {m['mean_mask_area']:.3f}"
        + (f"; pointing game (top-20% on the object box) {point:.1%}" if point is not None else "")
    )
    print(f"Wrote {run_dir}/rts.safetensors, metrics.json, config.yaml")
    return 0


def _print_attack_metrics(m: dict) -> None:
    norm = m.get("perturbation_norm")
    print(
        f"  budget: {m['norm']} eps={m['eps']:g} (0-255 units)"
        + (f"; measured norm of the perturbation: {norm:.4g}" if norm is not None else "")
    )
    line = f"  fooling ratio {m.get('fooling_ratio', float('nan')):.3f} on {m.get('n_images', 0)} test images"
    if "clean_accuracy" in m:
        line += f"; accuracy {m['clean_accuracy']:.3f} clean -> {m['adversarial_accuracy']:.3f} adversarial"
    print(line)
    if "target_success_rate" in m:
        print(f"  target success rate {m['target_success_rate']:.3f}")
    if m.get("transfer"):
        print("  maps (benign vs adversarial):  interpreter      L1     IoU   (random-map IoU)")
        for name, t in m["transfer"].items():
            if "l1" in t:
                print(
                    f"                                 {name:<12} {t['l1']:.3f}   {t['iou']:.3f}   "
                    f"({t['random_iou']:.3f})"
                )


def cmd_attack(args: argparse.Namespace) -> int:
    from .config import AttackRunConfig, load_config
    from .experiments import run_attack
    from .runs import failed_on_error, new_run_dir

    cfg = load_config(AttackRunConfig, args.config, args.overrides)
    run_dir = new_run_dir(args.out, command="attack", overwrite=args.overwrite)
    what = cfg.attack.name + (f" against {cfg.interpreter.name}" if cfg.interpreter.name else "")
    print(f"Running {what} on {cfg.classifier.name}; run folder: {run_dir}")
    with failed_on_error(run_dir):
        m = run_attack(cfg, run_dir, progress=not args.no_progress)
    _print_attack_metrics(m)
    print(
        f"Wrote {run_dir}/metrics.json, config.yaml"
        + (", perturbation.safetensors, perturbation.png" if (run_dir / "perturbation.png").exists() else "")
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import AttackRunConfig, load_config
    from .experiments import run_evaluate
    from .runs import failed_on_error, new_run_dir

    cfg = load_config(AttackRunConfig, args.config, args.overrides)
    run_dir = new_run_dir(args.out, command="evaluate", overwrite=args.overwrite)
    print(f"Evaluating {args.perturbation} on {cfg.classifier.name}; run folder: {run_dir}")
    with failed_on_error(run_dir):
        m = run_evaluate(cfg, args.perturbation, run_dir, progress=not args.no_progress)
    _print_attack_metrics(m)
    print(f"Wrote {run_dir}/metrics.json")
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "train-classifier": cmd_train_classifier,
    "demo": cmd_demo,
    "train-rts": cmd_train_rts,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="juap",
        description="Joint universal adversarial perturbations: fool a classifier, keep its interpretation.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show debug logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "demo",
        help="run the default experiment on the embedded synthetic data",
        description="Train (once, cached) the demo classifier and RTS model on the embedded data, run UAP, "
        "GUAP, R-JUAP and U-JUAP against CAM, Grad-CAM and RTS and JAP vs PGD, and write tables and "
        "figures. Sizes: --set demo.steps=..., --set demo.eps=... (see juap.demo.DemoSettings).",
    )
    _add_common(p)
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $JUAP_CACHE or ~/.cache/juap)")
    p = sub.add_parser(
        "train-classifier",
        help="train or fine-tune a classifier (Table I)",
        description="Train or fine-tune a registered classifier with random-crop + flip "
        "augmentation; report top-1 accuracy on the test split.",
    )
    _add_common(p)
    p = sub.add_parser(
        "train-rts",
        help="train the RTS saliency model for a classifier checkpoint",
        description="Train a real-time saliency (RTS) masking model (eq 12) that explains a trained "
        "classifier; needs --set classifier.weights=CHECKPOINT.",
    )
    _add_common(p)
    p = sub.add_parser(
        "attack",
        help="learn a perturbation (JUAP, GUAP, UAP, ...) or run a per-image attack",
        description="Fit an attack on the train split, evaluate it on the test split against "
        "every interpreter, and save the perturbation, generator and metrics.",
    )
    _add_common(p)
    p = sub.add_parser(
        "evaluate",
        help="evaluate a saved perturbation on a data set",
        description="Fooling ratio, accuracies and map L1/IoU of a saved perturbation.",
    )
    p.add_argument("--perturbation", "-p", required=True, metavar="FILE", help="perturbation.safetensors")
    _add_common(p)
    return parser


def main(argv: List[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s"
    )
    if not args.verbose:
        warnings.simplefilter("default")
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except JuapError as e:
        if args.verbose:
            raise
        print(f"juap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"juap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
