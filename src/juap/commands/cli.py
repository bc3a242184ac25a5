"""The ``juap`` command line: reads a config, builds objects by name, writes a run folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

from ..app.runs import check_config, failed_on_error, finish_run, new_run_dir, open_grid_dir
from ..errors import ConfigError, JuapError
from ..runtime import distributed
from ..runtime.config import apply_overrides, from_dict, load_config, read_yaml_mapping, to_dict
from .attack import AttackRunConfig, run_attack
from .configs import migrate_legacy_keys
from .demo import DemoSettings, open_demo_dir, run_demo
from .detect import DetectConfig, run_detect
from .evade import load_evade_config, plan_cells, run_evade
from .evaluate import run_evaluate
from .run import dry_run_experiment, load_experiment, parse_shard, plan, run_grid, write_results
from .shipped import CONFIG_DIR, copy_configs, list_configs, resolve_config
from .train_classifier import TrainClassifierConfig, run_train_classifier
from .train_rts import TrainRTSConfig, run_train_rts
from .zoo import ZOO_DIR, copy_zoo, list_zoo, measure_command, zoo_entry


def _add_common(
    p: argparse.ArgumentParser, *, out: bool = True, resume: bool = False, config: bool = True
) -> None:
    if config:
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
    if resume:
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the interrupted run in --out from its last checkpoint (same config; "
            "without --config/--set its config.yaml is reused)",
        )
        p.add_argument("--checkpoint-every", type=int, metavar="N", help="save a checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _open_run(args: argparse.Namespace, cls: type, command: str):
    """Load the config and open the run folder; ``--resume`` reopens it (reusing its ``config.yaml`` when
    no --config/--set is given) and refuses a config other than the one the run started with."""
    resume = _resume_options(args)["resume"]  # checked before the run folder is made
    source = args.config
    if resume and args.out and not args.config and not args.overrides:
        saved = Path(args.out) / "config.yaml"
        source = saved if saved.is_file() else None
    raw = apply_overrides(read_yaml_mapping(source) if source is not None else {}, args.overrides)
    cfg = from_dict(cls, migrate_legacy_keys(raw))  # an old key (rts_checkpoint) moved, with a warning
    run_dir = new_run_dir(args.out, command=command, overwrite=args.overwrite, resume=resume)
    check_config(run_dir, to_dict(cfg), resume=resume)
    args.run_dir = run_dir  # for the "how to resume" message on an interruption
    return cfg, run_dir


def _resume_options(args: argparse.Namespace) -> dict:
    every = getattr(args, "checkpoint_every", None)  # commands without --resume have neither option
    if every is not None and every < 1:
        raise ConfigError(f"--checkpoint-every {every} is out of range; give a number of steps >= 1")
    return {"resume": getattr(args, "resume", False), "checkpoint_every": every}


def cmd_train_classifier(args: argparse.Namespace) -> int:
    cfg, run_dir = _open_run(args, TrainClassifierConfig, "train-classifier")
    print(
        f"Training {cfg.classifier.name} on {cfg.data.name} data ({cfg.train.epochs} epochs); "
        f"run folder: {run_dir}"
    )
    with failed_on_error(run_dir):
        m = run_train_classifier(cfg, run_dir, progress=not args.no_progress, **_resume_options(args))
    print(
        f"Test top-1 accuracy: {m['test_accuracy']:.2%} on {m['test_images']} images "
        f"(trained in {m['train_seconds']:.0f} s)"
    )
    _say_wrote(run_dir)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    demo_over = [o for o in args.overrides if o.startswith("demo.")]
    cfg = load_config(TrainClassifierConfig, args.config, [o for o in args.overrides if o not in demo_over])
    settings = from_dict(DemoSettings, apply_overrides({}, demo_over).get("demo", {}), "demo")
    run_dir = open_demo_dir(args.out, overwrite=args.overwrite)  # a demo folder again: its cells reused
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
    print("  results.md      Tables II-IV, the transfer table and the detection table (start here)")
    print("  results.csv     one row per method x interpreter; transfer.csv: each perturbation x interpreter")
    print("  figure.png      benign vs adversarial images and maps (Fig. 4 style)")
    print("  discrepancy.png map L1 per method and interpreter (Fig. 5 style)")
    print("  fig1.png, roc.png, detection.csv  how well the maps reveal each perturbation (Fig. 1, ROC)")
    print("  metrics.json, perturbations/*.safetensors|png")
    print(f"Running it again (into {run_dir}) reuses its finished cells; the models stay cached;")
    print("`juap run embedded/...` for the tables of the paper one by one.")
    return 0


def cmd_train_rts(args: argparse.Namespace) -> int:
    cfg, run_dir = _open_run(args, TrainRTSConfig, "train-rts")
    print(
        f"Training the RTS saliency model for {cfg.classifier.weights} ({cfg.train.epochs} epochs); "
        f"run folder: {run_dir}"
    )
    t0 = time.perf_counter()
    with failed_on_error(run_dir):
        m = run_train_rts(cfg, run_dir, progress=not args.no_progress, **_resume_options(args))
    point = m.get("pointing_top20")
    print(
        f"Done in {time.perf_counter() - t0:.0f} s; mean mask area {m['mean_mask_area']:.3f}"
        + (f"; pointing game (top-20% on the object box) {point:.1%}" if point is not None else "")
    )
    _say_wrote(run_dir)
    return 0


def _print_attack_metrics(m: dict) -> None:
    norm = m.get("perturbation_norm")
    if m.get("eps") is None:  # evaluate: a perturbation file that records no budget, and none given
        print(
            f"  budget: none recorded; measured L_inf {m['perturbation_linf']:.4g}, "
            f"L_2 {m['perturbation_l2']:.4g} (0-255 units)"
        )
    else:
        source = {"file": " (from the perturbation file)", "config": " (from the config)"}
        print(
            f"  budget: {m['norm']} eps={m['eps']:g} (0-255 units){source.get(m.get('budget_source'), '')}"
            + (f"; measured norm of the perturbation: {norm:.4g}" if norm is not None else "")
        )
    line = f"  fooling ratio {m.get('fooling_ratio', float('nan')):.3f} on {m.get('n_images', 0)} test images"
    if "clean_accuracy" in m:
        line += f"; accuracy {m['clean_accuracy']:.3f} clean -> {m['adversarial_accuracy']:.3f} adversarial"
    print(line)
    if "target_success_rate" in m:
        print(f"  target success rate {m['target_success_rate']:.3f}")
    q = m.get("as_8bit")
    if q:  # what someone who adds the saved 8-bit file to an 8-bit image gets
        maps = ""
        if q.get("iou") is not None:
            maps = f", {q['map_interpreter']} IoU {q['iou']:.3f}, L1 {q['l1']:.3f}"
        print(f"  applied in 8 bits (whole 0-255 steps): fooling ratio {q['fooling_ratio']:.3f}{maps}")
    for spec, r in (m.get("robustness") or {}).items():  # both images through it before the model
        maps = f", {r['map_interpreter']} IoU {r['iou']:.3f}" if r.get("iou") is not None else ""
        print(f"  after {spec}: fooling ratio {r['fooling_ratio']:.3f}{maps}")
    if m.get("transfer"):
        print("  maps (benign vs adversarial):  interpreter      L1     IoU   (random-map IoU)")
        for name, t in m["transfer"].items():
            if "l1" in t:
                print(
                    f"                                 {name:<12} {t['l1']:.3f}   {t['iou']:.3f}   "
                    f"({t['random_iou']:.3f})"
                )
        faithful = {name: t for name, t in m["transfer"].items() if "deletion_benign" in t}
        if faithful:  # does the map still explain? deletion: lower is more faithful; insertion: higher
            print("  faithfulness (area, benign -> adversarial):  interpreter   deletion      insertion")
            for name, t in faithful.items():
                print(
                    f"                                              {name:<12}  "
                    f"{t['deletion_benign']:.3f} -> {t['deletion_adversarial']:.3f}  "
                    f"{t['insertion_benign']:.3f} -> {t['insertion_adversarial']:.3f}"
                )


def cmd_attack(args: argparse.Namespace) -> int:
    cfg, run_dir = _open_run(args, AttackRunConfig, "attack")
    what = cfg.attack.name + (f" against {cfg.interpreter.name}" if cfg.interpreter.name else "")
    print(f"Running {what} on {cfg.classifier.name}; run folder: {run_dir}")
    with failed_on_error(run_dir):
        m = run_attack(cfg, run_dir, progress=not args.no_progress, **_resume_options(args))
    _print_attack_metrics(m)
    _say_wrote(run_dir)
    return 0


def _say_wrote(run_dir: Path) -> None:
    """The files the run folder holds now (what every command promises is written, and no more)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name != "run.json")
    print(f"Wrote {run_dir}/: {', '.join(names)}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg, run_dir = _open_run(args, AttackRunConfig, "evaluate")
    print(f"Evaluating {args.perturbation} on {cfg.classifier.name}; run folder: {run_dir}")
    with failed_on_error(run_dir):
        m = run_evaluate(
            cfg,
            args.perturbation,
            run_dir,
            progress=not args.no_progress,
            budget_given=_budget_given(args),
            resize=args.resize,
        )
    _print_attack_metrics(m)
    _say_wrote(run_dir)
    return 0


def _budget_given(args: argparse.Namespace) -> bool:
    """Whether --config or --set names attack.eps or attack.norm (not merely their defaults)."""
    raw = apply_overrides(read_yaml_mapping(args.config) if args.config else {}, args.overrides)
    attack = raw.get("attack") if isinstance(raw.get("attack"), dict) else {}
    return "eps" in attack or "norm" in attack


def cmd_run(args: argparse.Namespace) -> int:
    say: Callable = print if distributed.is_main() else lambda *a, **k: None  # under torchrun: rank 0 alone
    exp = load_experiment(args.experiment, args.overrides)
    shard = parse_shard(args.shard)
    cells = plan(exp)
    if args.list:
        for k, cell in enumerate(cells):
            mark = "*" if k % shard[1] == shard[0] - 1 else " "
            say(f"{mark} {cell.id}  {cell.describe()}")
        say(f"{len(cells)} cells; * = in shard {shard[0]}/{shard[1]}")
        return 0
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="juap-dry-run-") as tmp:
            tiny = dry_run_experiment(exp, Path(tmp))
            say(f"Dry run of {exp.name}: {len(cells)} cells, one step each on tiny embedded data ...")
            res = run_grid(tiny, Path(tmp) / "run", shard=shard, progress=False, say=say)
            write_results(tiny, Path(tmp) / "run", res)
        say(f"Dry run passed: {res['ran']} cells built, trained one step and evaluated.")
        return 0
    out = args.out or Path("runs") / exp.name
    run_dir = open_grid_dir(out, experiment=exp.name, overwrite=args.overwrite)
    say(
        f"juap run {exp.name}: {len(cells)} cells"
        + (f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
        + f"; run folder: {run_dir} (finished cells are reused: run again to continue)"
    )
    t0 = time.perf_counter()
    args.rerun_hint = f"juap run {args.experiment} --out {run_dir}"  # printed if interrupted
    with failed_on_error(run_dir):
        res = run_grid(
            exp,
            run_dir,
            shard=shard,
            merge=[Path(m) for m in args.merge],
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            say=say,
        )
        write_results(exp, run_dir, res)
    summary = {k: v for k, v in res.items() if k != "rows"}
    done = res["complete"] == res["cells"]
    finish_run(run_dir, config=to_dict(exp), metrics={**summary, "rows": res["rows"]}, complete=done)
    say(
        f"{res['complete']} of {res['cells']} cells finished ({res['ran']} run now, "
        f"{time.perf_counter() - t0:.0f} s). Tables: {run_dir}/results.md, results.csv, transfer.csv"
    )
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    cfg, run_dir = _open_run(args, DetectConfig, "detect")
    print(f"Detecting {len(args.perturbation)} perturbation(s) from their maps; run folder: {run_dir}")
    with failed_on_error(run_dir):
        m = run_detect(cfg, args.perturbation, run_dir, progress=not args.no_progress, say=print)
    print(
        f"{m['train_images']} images trained the detectors, {m['test_images']} held-out images evaluated "
        f"them ({m['seconds']:.0f} s):\n"
    )
    print(m["markdown"])
    print(f"\nWrote {run_dir}/detection.md, detection.csv, roc.png, fig1.png, metrics.json")
    return 0


def cmd_evade(args: argparse.Namespace) -> int:
    cfg = load_evade_config(args.experiment, args.overrides)
    shard = parse_shard(args.shard)
    cells = plan_cells(cfg.evade)
    if args.list:
        for k, cell in enumerate(cells):
            mark = "*" if k % shard[1] == shard[0] - 1 else " "
            note = "  (headline: sanity checks)" if cell.headline else ""
            print(f"{mark} {cell.id}  rounds 0-{cell.rounds}{note}")
        print(f"{len(cells)} cells; * = in shard {shard[0]}/{shard[1]}")
        return 0
    out = args.out or Path("runs") / cfg.name
    run_dir = open_grid_dir(out, experiment=cfg.name, overwrite=args.overwrite, command="evade")
    check_config(run_dir, to_dict(cfg), resume=(run_dir / "config.yaml").is_file())
    print(
        f"juap evade {cfg.name}: {len(cells)} cells (seed x budget x interpreter)"
        + (f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
        + f"; run folder: {run_dir} (finished cells are reused: run again to continue)"
    )
    args.rerun_hint = f"juap evade {args.experiment} --out {run_dir}"  # printed if interrupted
    with failed_on_error(run_dir):
        res = run_evade(
            cfg, run_dir, shard=shard, cache_dir=args.cache_dir, progress=not args.no_progress, say=print
        )
    done = res["complete"] == res["cells"]
    summary = {k: v for k, v in res.items() if k != "rows"}
    finish_run(run_dir, config=to_dict(cfg), metrics=summary, complete=done)
    print((run_dir / "results.md").read_text())
    print(
        f"{res['complete']} of {res['cells']} cells finished ({res['ran']} run now, {res['seconds']:.0f} s). "
        f"Report: {run_dir}/results.md, evasion.csv, evasion.json and the figures"
    )
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if args.name is None:
        if args.out:
            raise ConfigError("--out needs a NAME to copy (or `all`); `juap configs` lists the names")
        print(f"Experiment and training files shipped with juap ({CONFIG_DIR}):")
        for name in list_configs():
            print(f"  {name}")
        print("Run one by name (`juap run embedded/claims.yaml`, `--config intel/rts_resnet18.yaml`) or copy")
        print("it out to edit: `juap configs NAME --out DIR` (NAME `all` copies every file).")
        return 0
    if not args.out:
        raise ConfigError(f"give --out DIR to copy {args.name!r} into")
    written = copy_configs(args.name, args.out)
    for path in written:
        print(f"Wrote {path}")
    if not written:
        print(f"{args.out} already holds identical copies; nothing written")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.name is None:
        if args.out:
            raise ConfigError("--out needs a NAME to copy; `juap zoo` lists the names")
        entries = list_zoo()
        print(f"Perturbations shipped with juap ({ZOO_DIR}), figures as applied in 8 bits:")
        for e in entries:
            m = e["meta"]
            iou = f", {e['interpreter']} IoU {e['iou']:.3f}" if e.get("iou") is not None else ""
            print(
                f"  {e['name']:<36} {m.get('classifier_arch')} {m['shape'][-1]} px, {m['attack']} "
                f"{m['norm']} {m['eps']:g}: FR {e['fooling_ratio']:.3f}{iou} on {e['n_images']} images"
            )
        print("Details: `juap zoo NAME`; a copy: `juap zoo NAME --out DIR`.")
        return 0
    entry = zoo_entry(args.name)
    if not args.out:
        print(json.dumps(entry["meta"], indent=1))
        print(f"\nMeasure a copy again:  {measure_command(entry)}")
        return 0
    written = copy_zoo(args.name, args.out)
    print(f"Wrote {written}" if written else f"{args.out} already holds an identical copy; nothing written")
    print(f"Measure it:  cd {args.out} && {measure_command(entry)}")
    return 0


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "train-classifier": cmd_train_classifier,
    "demo": cmd_demo,
    "train-rts": cmd_train_rts,
    "detect": cmd_detect,
    "run": cmd_run,
    "evade": cmd_evade,
    "configs": cmd_configs,
    "zoo": cmd_zoo,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``juap`` parser: one subcommand per entry of :data:`COMMANDS`, in ``juap --help``'s order."""
    parser = argparse.ArgumentParser(
        prog="juap",
        description="Joint universal adversarial perturbations: fool a classifier, keep its interpretation.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show debug logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(sub.add_parser)
    _add_resumable_parsers(sub.add_parser)
    _add_perturbation_parsers(sub.add_parser)
    _add_run_parser(sub.add_parser)
    _add_evade_parser(sub.add_parser)
    _add_configs_parser(sub.add_parser)
    _add_zoo_parser(sub.add_parser)
    return parser


# What each _add_*_parser is given: the sub-parsers' add_parser(name, help=..., description=...).
AddParser = Callable[..., argparse.ArgumentParser]


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $JUAP_CACHE or ~/.cache/juap)")


def _add_demo_parser(add: AddParser) -> None:
    p = add(
        "demo",
        help="run the default experiment on the embedded synthetic data",
        description="Load the demo classifier and RTS model shipped with juap (--set demo.retrain=true: "
        "train them on this machine, once, into the cache), run the "
        "grid of embedded/demo.yaml (UAP, SGD-UAP, GUAP, R-JUAP and U-JUAP against CAM, Grad-CAM and RTS) "
        "into OUT/cells/ (OUT default: runs/demo), JAP vs PGD and detection, and write tables and figures. "
        "Running again into the same folder reuses its finished cells. Sizes: --set demo.steps=..., "
        "--set demo.eps=..., --set demo.seed=1 (see juap.commands.demo.DemoSettings).",
    )
    _add_common(p)
    _add_cache_dir(p)


# The commands that train from a config into a run folder and can --resume: (name, help, description).
RESUMABLE = (
    (
        "train-classifier",
        "train or fine-tune a classifier (Table I)",
        "Train or fine-tune a registered classifier with random-crop + flip "
        "augmentation; report top-1 accuracy on the test split.",
    ),
    (
        "train-rts",
        "train the RTS saliency model for a classifier checkpoint",
        "Train a real-time saliency (RTS) masking model (eq 12) that explains a trained "
        "classifier; needs --set classifier.weights=CHECKPOINT.",
    ),
    (
        "attack",
        "learn a perturbation (JUAP, GUAP, UAP, ...) or run a per-image attack",
        "Fit an attack on the train split, evaluate it on the test split against "
        "every interpreter, and save the perturbation, generator and metrics.",
    ),
)


def _add_resumable_parsers(add: AddParser) -> None:
    for name, summary, description in RESUMABLE:
        _add_common(add(name, help=summary, description=description), resume=True)


def _add_perturbation_parsers(add: AddParser) -> None:
    """``evaluate`` and ``detect``: both read saved perturbation files."""
    p = add(
        "evaluate",
        help="evaluate a saved perturbation on a data set",
        description="Fooling ratio, accuracies and map L1/IoU of a saved perturbation.",
    )
    p.add_argument(
        "--perturbation", "-p", required=True, metavar="FILE",
        help="perturbation.safetensors, or the exact 8-bit perturbation.png written beside it",
    )  # fmt: skip
    p.add_argument(
        "--resize", action="store_true",
        help="resize a perturbation made for another input size (bilinear, then projected into its budget)",
    )  # fmt: skip
    _add_common(p)
    p = add(
        "detect",
        help="how well attribution maps reveal saved perturbations (AUROC, TPR at 5%% FPR)",
        description="Measure how well an inspector of attribution maps separates benign from adversarial "
        "test images for each perturbation and interpreter: the reference inspector (sees I(x) and "
        "I(x_hat)) and a deployable logistic-regression detector (sees only the input's own map), trained "
        "on half of the images and tested on the other half, in-distribution and cross-attack.",
    )
    p.add_argument(
        "--perturbation",
        "-p",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help="perturbation.safetensors, optionally named (default: its attack); repeatable",
    )
    _add_common(p)


def _add_run_parser(add: AddParser) -> None:
    p = add(
        "run",
        help="run a grid of attacks from an experiment file and write the paper's tables",
        description="Cross the grid of an experiment file (attacks x generators x interpreters x budgets "
        "x objectives x classifiers x variants), run every cell not finished yet into OUT/cells/, and "
        "write results.md, results.csv and transfer.csv. Run it again to continue an interrupted grid.",
    )
    _add_cell_options(p, help="experiment file, or the name of a shipped one (`juap configs` lists them)")
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="DIR",
        help="also take finished cells from another run folder of this experiment (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="run every cell one step on tiny data, then stop")


def _add_cell_options(p: argparse.ArgumentParser, *, help: str, default: str | None = None) -> None:
    """What the commands that run resumable cells share: the experiment, --shard, --list, the cache."""
    nargs = {"nargs": "?", "default": default} if default else {}
    p.add_argument("experiment", metavar="EXPERIMENT.yaml", help=help, **nargs)
    _add_common(p, config=False)
    p.add_argument(
        "--shard", metavar="I/N", help="run only every N-th cell, starting at the I-th (1 <= I <= N)"
    )
    p.add_argument("--list", action="store_true", help="list the cells and stop")
    _add_cache_dir(p)


def _add_evade_parser(add: AddParser) -> None:
    p = add(
        "evade",
        help="can map-based detectors be evaded? detectors, adaptive attacks, arms race, budget sweep",
        description="Train detectors on attribution maps (and activations) to flag universal perturbations, "
        "attack them with JUAP/GUAP that know the detector and its threshold, retrain, repeat for "
        "evade.rounds rounds, over a sweep of budgets; report AUROC, TPR at 1% / 5% FPR and the evasion "
        "rate (fooled and not flagged), non-adaptive beside adaptive, with sanity flags. Resumable: run "
        "again to continue.",
    )
    _add_cell_options(
        p,
        help="experiment file or a shipped one's name (default: embedded/evasion.yaml)",
        default="embedded/evasion.yaml",
    )


def _add_configs_parser(add: AddParser) -> None:
    _add_shipped_parser(
        add,
        "configs",
        help="list the shipped experiment and training files, or copy one out",
        description="Without NAME: list the experiment and training files shipped with juap (any command "
        "takes such a name where it takes a YAML file that does not exist). With NAME and --out DIR: copy "
        "that file and the base files it extends into DIR (NAME `all`: every file); never overwrites.",
        name_help="a shipped file (embedded/claims.yaml) or all",
    )


def _add_zoo_parser(add: AddParser) -> None:
    _add_shipped_parser(
        add,
        "zoo",
        help="list the perturbations shipped with juap, show one, or copy one out",
        description="Without NAME: list the perturbations shipped with juap (exact 8-bit PNGs with their "
        "provenance and recorded figures). With NAME: its metadata and the `juap evaluate` command that "
        "measures it again. With NAME and --out DIR: copy it into DIR; never overwrites.",
        name_help="a shipped perturbation (see `juap zoo`)",
    )


def _add_shipped_parser(add: AddParser, command: str, *, help: str, description: str, name_help: str) -> None:
    """A command over files shipped inside the package: ``NAME`` (optional) and ``--out DIR`` to copy into."""
    p = add(command, help=help, description=description)
    p.add_argument("name", nargs="?", metavar="NAME", help=name_help)
    p.add_argument("--out", "-o", metavar="DIR", help="folder to copy into")


def _resolve_shipped(args: argparse.Namespace) -> None:
    """A --config or experiment path that does not exist may name a shipped file (``juap configs``)."""
    for key in ("config", "experiment"):
        if getattr(args, key, None):
            setattr(args, key, str(resolve_config(getattr(args, key))))


def main(argv: List[str] | None = None) -> int:
    """``juap ...``: the exit status (0 done, 2 a usage or input error, 130 interrupted)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader closed the pipe (``juap configs | head``): stop quietly
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output): nothing to flush there
        pass


def _main(argv: List[str] | None) -> int:
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
        with _sigterm_as_interrupt():
            _resolve_shipped(args)
            return _run_command(args)
    except JuapError as e:
        if args.verbose:
            raise
        print(f"juap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except OSError as e:  # a file-system error juap did not foresee: still one line, naming the file
        if args.verbose:
            raise
        print(f"juap {args.command}: error: {e} (--verbose shows where it happened)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; a training loop saved a checkpoint first
        print(f"juap {args.command}: {e or 'interrupted'}", file=sys.stderr)
        if getattr(args, "rerun_hint", None):  # juap run: finished cells are kept, the rest resume
            print(f"To continue, run again: {args.rerun_hint}", file=sys.stderr)
        elif getattr(args, "run_dir", None) is not None and hasattr(args, "resume"):
            print(f"To continue, run: juap {args.command} --out {args.run_dir} --resume", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (e.g. a scheduler's stop) behaves like Ctrl-C: a clean exit with a message, not a kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("stopped by SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# Commands that run data-parallel under torchrun (juap.runtime.distributed); the others refuse it.
DATA_PARALLEL = ("attack", "evaluate", "run", "train-classifier", "train-rts")


def _run_command(args: argparse.Namespace) -> int:
    """Run one command, joining torchrun's process group when launched by it: then only rank 0 prints,
    shows progress bars and writes files; every rank reports its own errors."""
    distributed.init_from_env()
    done = False
    try:
        if distributed.world_size() > 1 and args.command not in DATA_PARALLEL:
            distributed.refuse_multi_process(args.command)
        if distributed.is_main():
            code = COMMANDS[args.command](args)
        else:
            args.no_progress = True
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                code = COMMANDS[args.command](args)
        done = True
        return code
    finally:  # every rank leaves together, and the process group is gone before Python shuts down
        distributed.cleanup(wait_for_others=done)


if __name__ == "__main__":
    sys.exit(main())
