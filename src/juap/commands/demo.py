"""``juap demo``: the paper's experiment, scaled down to the embedded synthetic data and a laptop CPU.

1. the embedded data set (generated once into the cache) and the demo classifier;
2. the RTS saliency model for it (both shipped inside the package, see :mod:`juap.commands.demo_models`;
   ``--set demo.retrain=true`` trains them on this machine instead, once, into the cache);
3. the grid of ``configs/embedded/demo.yaml`` (UAP, SGD-UAP, GUAP, R-JUAP and U-JUAP against CAM, Grad-CAM
   and RTS), run by the grid engine (:func:`juap.commands.run.run_grid`) into ``<out>/cells/`` on the
   demo's split (:func:`attack_split`), each cell an ordinary attack run
   (:func:`juap.commands.attack.fit_and_measure`: checkpoints, ``history.csv``, the perturbation and
   generator, every perturbation evaluated against every interpreter: the transfer table); finished
   cells are reused when the demo runs again into the same folder;
4. whether the paper's headline holds (JUAP keeps GUAP's fooling ratio, within 0.05, with an IoU higher
   by 0.1 and a lower L1), interpreter by interpreter, how far each verdict is from those thresholds
   beside the claims benchmark's 3-seed sd; JAP vs PGD on a small subset;
5. ``results.md`` (Tables II-IV in the paper's shape, and the maps under methods no attack trained against:
   ``transfer_peers.csv``), ``results.csv``, ``metrics.json``,
   ``figure.png`` (Fig. 4 style), ``discrepancy.png`` (Fig. 5 style), ``perturbations/*.png`` and the
   detection section (:func:`juap.commands.detect.demo_detection`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import TensorDataset

from .. import create_attack
from .._registry import INTERPRETERS as INTERPRETER_CLASSES
from ..app.artifacts import load_perturbation, perturbation_provenance, save_perturbation
from ..app.report import bar_chart, figure_grid, markdown_table, transition_section, write_csv
from ..app.runs import new_run_dir
from ..budget import apply_perturbation
from ..classifiers import load_classifier
from ..data import load_splits, save_split
from ..data.synthetic import default_cache_dir
from ..errors import ConfigError
from ..evaluation import evaluate
from ..metrics import HEADLINE_FR_GAP, HEADLINE_IOU_GAIN, headline_misses
from ..runtime.config import to_dict
from ..runtime.io import remove_stale_temporaries, write_json, write_text
from .attack import fit_and_measure
from .build import build_attack, build_interpreter
from .demo_models import RTS_EPOCHS, DemoModel, demo_classifier, demo_rts
from .detect import demo_detection
from .run import DEMO, ExperimentConfig, load_experiment, main_rows, plan, run_grid
from .train_classifier import TrainClassifierConfig

DEMO_EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "embedded" / "demo.yaml"
INTERPRETERS = ("cam", "gradcam", "rts")
FR_GAP, IOU_GAIN = HEADLINE_FR_GAP, HEADLINE_IOU_GAIN  # the headline (juap.metrics.headline_misses)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's own sizes, and what ``--set demo.KEY=...`` changes in its experiment file.

    The recipe (attacks, hyperparameters, budget, seed) is ``configs/embedded/demo.yaml``'s, read by
    :func:`demo_experiment`; ``steps``, ``eps`` and ``seed`` left at None keep that file's values, and
    ``experiment`` overrides any other key of it (``--set demo.experiment.attack_params.juap.lam=0.3``).
    The other fields size the demo's own steps and fit a 10-minute first run on a 2-core CPU.
    """

    steps: Optional[int] = None  # GUAP's and JUAP's steps (demo.yaml: 200), each picked every steps // 4
    eps: Optional[float] = None  # the budget in 0-255 units (demo.yaml: the paper's L_inf 10; 24 is 2.4x)
    seed: Optional[int] = None  # the attacks' and the split's seed (demo.yaml: 0)
    experiment: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more keys of demo.yaml
    attack_train_images: int = 300  # the attacks learn from these (demo.yaml's val_fraction held out)
    attack_test_images: int = 300  # every figure is measured on these
    jap_images: int = 30
    jap_steps: int = 40
    rts_epochs: int = RTS_EPOCHS  # the learned interpreter's training (the shipped model: RTS_EPOCHS)
    retrain: bool = False  # train the demo models on this machine (into the cache) instead of the shipped


def demo_experiment(
    s: DemoSettings = DemoSettings(),
    *,
    data: Optional[Dict[str, Any]] = None,
    classifier: Optional[Dict[str, Any]] = None,
) -> ExperimentConfig:
    """The demo's grid: ``configs/embedded/demo.yaml`` with the settings ``s`` give mapped onto it.

    Args:
        s: the demo's settings: ``steps`` (GUAP's and JUAP's, with ``eval_every`` a quarter of them),
            ``eps`` (the budget of demo.yaml's norm), ``seed`` and ``experiment`` (any key of demo.yaml).
        data: the ``data`` section (the demo: the classifier's data set, whose held-out images it splits).
        classifier: the grid's one classifier (the demo: its models), e.g.
            ``{name, label, weights, checkpoints, options}``.
    """
    patch: Dict[str, Any] = copy.deepcopy(s.experiment)
    if s.steps is not None:
        for name in ("guap", "juap"):  # the generator attacks
            patch.setdefault("attack_params", {}).setdefault(name, {}).update(
                steps=s.steps, eval_every=max(1, s.steps // 4)
            )
    if s.seed is not None:
        patch["seed"] = s.seed
    if s.eps is not None:
        norm = _load(patch).grid.budgets[0].norm
        patch.setdefault("grid", {})["budgets"] = [{"norm": norm, "eps": s.eps}]
    if data is not None:
        patch["data"] = data
    if classifier is not None:
        patch.setdefault("grid", {})["classifiers"] = [classifier]
    return _load(patch)


def demo_cell_params(
    attack: str, *, interpreter: Optional[str] = None, generator: Optional[str] = None
) -> Dict[str, Any]:
    """The hyperparameters the demo runs one cell of its grid with (e.g. ``("juap", interpreter="cam")``,
    the first generator unless ``generator``), as demo.yaml gives them; for benchmarks that time or sweep
    the demo's attacks outside its grid.

    Raises:
        ConfigError: the demo's grid has no such cell.
    """
    for c in plan(demo_experiment()):
        if (c.attack, c.interpreter) == (attack, interpreter) and c.generator in (
            None,
            generator or c.generator,
        ):
            return dict(c.params)
    raise ConfigError(f"the demo's grid ({DEMO_EXPERIMENT.name}) has no {attack} cell against {interpreter}")


def _load(patch: Dict[str, Any]) -> ExperimentConfig:
    try:
        return load_experiment(DEMO_EXPERIMENT, list(_overrides(patch)))
    except ConfigError as e:
        raise ConfigError(f"{e} (the demo settings mapped onto {DEMO_EXPERIMENT.name})") from None


def _overrides(patch: Dict[str, Any], prefix: str = ""):
    """``a.b=value`` strings (values as JSON, which YAML reads) for every leaf of ``patch``."""
    for k, v in patch.items():
        if isinstance(v, dict) and v:
            yield from _overrides(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}={json.dumps(v)}"


@dataclasses.dataclass(frozen=True)
class AttackSplit:
    """The demo's attack images: a seeded shuffle of the classifier's held-out images, cut in three."""

    x_train: torch.Tensor  # (n_train, 3, H, W) in [0, 1]: the universal attacks learn from these
    y_train: torch.Tensor  # (n_train,) true classes
    x_val: torch.Tensor  # (n_val, 3, H, W): the attacks pick their perturbation on these (none trained on)
    y_val: torch.Tensor  # (n_val,)
    x_test: torch.Tensor  # (n_test, 3, H, W): every figure is measured on these
    y_test: torch.Tensor  # (n_test,)
    record: Dict[str, Any]  # how they were drawn and which images they are (``split.json``)


def attack_split(
    held, *, n_train: int = 300, n_test: int = 300, seed: int = 0, val_fraction: float = 0.0
) -> AttackSplit:
    """The demo's attack-train / validation / attack-test images (``juap demo`` and ``benchmarks/``).

    Args:
        held: the classifier's held-out images (``splits.test`` of its data), ``(image, label)`` items.
        n_train, n_test: how many of each; when together they exceed ``held``, half of it each.
        seed: the seed of the shuffle and of the validation draw (``demo.seed``).
        val_fraction: the part of the ``n_train`` images held out for validation (at least one when
            above 0), drawn as ``juap attack`` draws its own; training uses the rest.
    """
    if n_train + n_test > len(held):
        n_train = n_test = len(held) // 2
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[: n_train + n_test]  # split indices are sorted by class folder: shuffled first
    n_val = max(1, round(val_fraction * n_train)) if val_fraction > 0 else 0
    n_val = n_val if n_val < n_train else 0  # one training image: none held out (as ``juap attack``)
    val_part = set(torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    parts = {
        "attack_train": [k for k in range(n_train) if k not in val_part],
        "attack_val": sorted(val_part),
        "attack_test": list(range(n_train, n_train + n_test)),
    }
    items = [held[i] for i in chosen]
    x = torch.stack([it[0] for it in items]) if items else torch.empty(0)
    y = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    base = getattr(held, "indices", None)  # a SplitView: indices into the data set's files
    where = [base[i] for i in chosen] if base is not None else chosen
    record: Dict[str, Any] = {
        "from": "the classifier's held-out (test) split, shuffled; attack_val drawn from the attack-train",
        "seed": seed,
        "val_fraction": val_fraction,
        **{name: [where[k] for k in ks] for name, ks in parts.items()},
    }
    tensors = [t[torch.tensor(ks, dtype=torch.long)] for ks in parts.values() for t in (x, y)]
    return AttackSplit(*tensors, record)


DEFAULT_OUT = Path("runs") / "demo"


def open_demo_dir(out: Optional[str | Path], *, overwrite: bool = False) -> Path:
    """The demo's run folder (default ``runs/demo``): a new one, or an earlier demo's folder reopened,
    finished or not, so that its finished cells (``cells/``) are reused; ``overwrite`` empties it.
    Running ``juap demo`` again therefore recomputes only what changed (cells of other settings are
    kept in ``cells/`` beside the ones used)."""
    out = DEFAULT_OUT if out is None else out
    if not overwrite:
        path = Path(out)
        try:
            run = json.loads((path / "run.json").read_text())
        except (OSError, ValueError):
            run = {}
        if isinstance(run, dict) and run.get("command") == "demo":
            remove_stale_temporaries(path)
            now = datetime.datetime.now().isoformat(timespec="seconds")
            run.update(status="running", resumed=[*run.get("resumed", []), now])
            run.pop("error", None)
            write_json(path / "run.json", run)
            return path
    return new_run_dir(out, command="demo", overwrite=overwrite)


def run_demo(
    run_dir: Path,
    *,
    settings: DemoSettings = DemoSettings(),
    classifier_cfg: Optional[TrainClassifierConfig] = None,
    cache_dir: Optional[str] = None,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """Run the whole demo into ``run_dir``; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    ccfg = classifier_cfg or TrainClassifierConfig()
    s = settings
    demo_experiment(s)  # a bad setting fails now, before any model is loaded or trained
    clf, splits, clf_model, learned_model = _demo_models(ccfg, s, cache, progress, say)
    checkpoints = {"rts": str(learned_model.path)}  # the model of each learned interpreter (the demo: RTS)
    interps = {n: build_interpreter(n, clf, checkpoint=checkpoints.get(n)) for n in INTERPRETERS}
    exp = demo_experiment(
        s, data=to_dict(ccfg.data), classifier=_grid_classifier(ccfg, clf_model, learned_model, checkpoints)
    )
    budget = exp.grid.budgets[0]
    split = attack_split(
        splits.test,
        n_train=s.attack_train_images,
        n_test=s.attack_test_images,
        seed=exp.seed,
        val_fraction=exp.val_fraction,
    )
    x_test, y_test = split.x_test, split.y_test
    say(
        f"[3/5] Universal attacks at {budget.norm} eps={budget.eps:g} (0-255 units), {len(split.x_train)} "
        f"training / {len(split.x_val)} validation / {len(x_test)} test images: the grid of "
        f"{DEMO_EXPERIMENT.name} into {run_dir / 'cells'} ..."
    )
    grid, perturbations = _universal(run_dir, exp, clf, interps, split, splits.classes, progress, say)
    results = grid["rows"]
    claims = _headline(results, budget, say)
    jap_rows = _image_dependent(clf, interps, x_test, y_test, exp, s, say)

    say("[5/5] Writing tables and figures ...")
    _write_outputs(
        run_dir, results, claims, jap_rows, perturbations, clf, interps, x_test, splits.classes, budget
    )
    detection = _detection(run_dir, interps, perturbations, x_test, splits.classes, exp.seed, say)
    metrics = {
        "classifier": {**clf_model.metrics, "source": clf_model.source},
        "rts": {**learned_model.metrics, "source": learned_model.source},
        "settings": dataclasses.asdict(settings),
        "experiment": to_dict(exp),
        "cells": {k: grid[k] for k in ("cells", "complete", "ran")},
        "universal": results,
        "claims": claims,
        "image_dependent": jap_rows,
        "detection": detection,
        "demo_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _headline(results: List[Dict[str, Any]], budget, say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The headline checks of the grid's ``results`` at ``budget``, printed one line each."""
    claims = headline_checks(results, spread=claims_spread(budget.norm, budget.eps))
    say(
        f"      The paper's headline, per interpreter (JUAP vs GUAP: FR >= GUAP's - {FR_GAP}, "
        f"IoU >= GUAP's + {IOU_GAIN}, L1 lower; how far each is from those thresholds):"
    )
    for c in claims:
        say(f"      {verdict_line(c)}")
    return claims


def _image_dependent(clf, interps, x, y, exp: ExperimentConfig, s: DemoSettings, say) -> List[Dict[str, Any]]:
    """Step 4: JAP vs PGD on the first ``s.jap_images`` test images, printed one line each."""
    say(f"[4/5] JAP vs PGD on {s.jap_images} test images ...")
    rows = _jap_vs_pgd(clf, interps, x[: s.jap_images], y[: s.jap_images], exp, s.jap_steps)
    for r in rows:
        say(
            f"      {r['method']:<12} vs {r['interpreter']:<8} fooling ratio {r['fooling_ratio']:.2f}, "
            f"IoU {r['iou']:.2f}, L1 {r['l1']:.3f}"
        )
    return rows


def _detection(run_dir: Path, interps, perturbations, x_test, classes, seed: int, say) -> Dict[str, Any]:
    """The Detection section of results.md: UAP, SGD-UAP, GUAP and R-JUAP trained against each interpreter."""
    chosen = {m: perturbations[(m, "-")] for m in ("UAP", "SGD-UAP", "GUAP") if (m, "-") in perturbations}
    chosen.update({f"R-JUAP-{i}": p for (m, i), p in perturbations.items() if m == "R-JUAP"})
    return demo_detection(run_dir, interps, chosen, x_test, class_names=classes, seed=seed, say=say)


_SOURCE = {"shipped": "shipped with juap (sha256 checked)", "cache": "loaded from cache"}


def _demo_models(ccfg, s: DemoSettings, cache: Path, progress: bool, say: Callable[[str], None]):
    """Steps 1 and 2: the demo classifier and its learned interpreter's model (RTS): the ones shipped in
    the package (:mod:`juap.commands.demo_models`), or with ``s.retrain`` or another config trained once
    into the cache.

    Returns:
        ``(classifier, splits, classifier model, learned interpreter model)``, each model a
        :class:`~juap.commands.demo_models.DemoModel` (file, metrics, source).
    """
    say("[1/5] Embedded data set and demo classifier ...")
    splits = load_splits(ccfg.data, augment_train=True, progress=progress)
    clf_model = demo_classifier(ccfg, splits, cache_dir=cache, retrain=s.retrain, progress=progress)
    clf = load_classifier(clf_model.path)
    m = clf_model.metrics
    how = _SOURCE.get(clf_model.source) or f"trained in {m['train_seconds']:.0f} s"
    say(
        f"      {ccfg.classifier.name}: {how}; test top-1 accuracy {m['test_accuracy']:.1%} on "
        f"{m['test_images']} images of {len(splits.classes)} classes ({', '.join(splits.classes)})"
    )
    say("[2/5] RTS saliency model for this classifier ...")
    learned = demo_rts(
        ccfg, clf_model, epochs=s.rts_epochs, cache_dir=cache, retrain=s.retrain, progress=progress
    )
    m = learned.metrics
    how = _SOURCE.get(learned.source) or f"trained in {m.get('train_seconds', 0):.0f} s"
    say(
        f"      {how}; pointing game (top-20% of the mask on the object) {m.get('pointing_top20') or 0.0:.1%}"
    )
    return clf, splits, clf_model, learned


def _grid_classifier(
    ccfg, model: DemoModel, learned: DemoModel, checkpoints: Dict[str, str]
) -> Dict[str, Any]:
    """The grid's one classifier: the demo's, named ``demo`` when shipped (its cells then have the same
    names on every machine and install), else by its files in the cache."""
    shipped = model.source == learned.source == "shipped"
    return {
        "name": ccfg.classifier.name,
        "label": f"demo-{ccfg.classifier.name}",
        "options": dict(ccfg.classifier.options),
        "weights": DEMO if shipped else str(model.path),
        "checkpoints": {n: DEMO for n in checkpoints} if shipped else checkpoints,
    }


def _universal(
    run_dir: Path, exp: ExperimentConfig, clf, interps, split: AttackSplit, classes, progress, say
):
    """The demo's grid run by the grid engine into ``run_dir/cells`` on ``split``; returns ``run_grid``'s
    result and each cell's perturbation by (method, trained_against)."""
    grid = run_grid(
        exp,
        run_dir,
        progress=progress,
        say=lambda line: say(f"      {line}"),
        run_cell=_cell_runner(clf, interps, split, classes, progress=progress),
        data_key={  # the cells learn from the demo's split, not from exp.data's
            "demo_split": {k: split.record[k] for k in ("from", "seed", "val_fraction")},
            "attack_train": len(split.x_train),
            "attack_val": len(split.x_val),
            "attack_test": len(split.x_test),
        },
    )
    perturbations: Dict[Tuple[str, str], torch.Tensor] = {}
    for r in grid["rows"]:
        if (r["method"], r["trained_against"]) not in perturbations:
            path = Path(r["folder"]) / "perturbation.safetensors"
            perturbations[(r["method"], r["trained_against"])] = load_perturbation(path)
    return grid, perturbations


def _cell_runner(clf, interps, split: AttackSplit, classes, *, progress: bool) -> Callable:
    """``run_grid``'s ``run_cell`` on the demo's split, as ``juap attack`` runs
    (:func:`~juap.commands.attack.fit_and_measure`): fit on the attack-train images, pick the perturbation
    on the validation images (none of them trained on), with checkpoints, ``history.csv`` and the
    artifacts; measure on the attack-test images against every interpreter. ``split.json`` names the
    images."""
    train = TensorDataset(split.x_train, split.y_train)
    val = TensorDataset(split.x_val, split.y_val) if len(split.x_val) else None
    test = [(split.x_test, split.y_test)]  # one batch: the random-map floor draws as it always did

    def run_cell(cfg, cell_dir: Path, resume: bool = False) -> Dict[str, Any]:
        torch.manual_seed(cfg.seed)  # as juap attack: a cell's draws do not depend on the cells before it
        interp = interps[cfg.interpreter.name] if cfg.interpreter.name else None
        attack = build_attack(cfg.attack, clf, interp, seed=cfg.seed)
        save_split(cell_dir / "split.json", split.record)
        return fit_and_measure(
            cell_dir,
            cfg,
            clf,
            attack,
            train=train,
            val=val,
            test=test,
            interpreters=lambda: interps,
            class_names=classes,
            progress=progress,
            resume=resume,
        )

    return run_cell


# -- the headline verdicts ----------------------------------------------------------------------------
SPREAD_FILE = Path(__file__).resolve().parents[1] / "weights" / "demo" / "headline_spread.json"
_SPREAD_KEYS = {"FR": "fooling_ratio_sd", "IoU": "iou_sd"}


def claims_spread(norm: str, eps: float, path: Path = SPREAD_FILE) -> Dict[str, Dict[str, float]]:
    """The 3-seed sd of each headline cell at the budget ``norm``/``eps`` in the claims benchmark
    (``benchmarks/bench_claims.py``; package data made from its claims.json by
    ``benchmarks/make_demo_data.py spread``): ``{variant: {"FR": sd, "IoU": sd}}``, empty at a budget it
    did not measure."""
    if not path.is_file():
        return {}
    budget = f"{norm}-{eps:g}"
    cells = json.loads(path.read_text())["cells"]
    return {
        c["variant"]: {part: c[key] for part, key in _SPREAD_KEYS.items()}
        for c in cells
        if c["budget"] == budget
    }


def headline_margins(juap: Mapping[str, float], guap: Mapping[str, float]) -> Dict[str, float]:
    """How far a JUAP result is from the headline's thresholds (:func:`~juap.metrics.headline_misses`),
    signed, positive where it clears them: ``FR`` = its FR - (GUAP's - 0.05), ``IoU`` = its IoU - (GUAP's
    + 0.1)."""
    return {
        "FR": juap["fooling_ratio"] - (guap["fooling_ratio"] - FR_GAP),
        "IoU": juap["iou"] - (guap["iou"] + IOU_GAIN),
    }


def threshold_distance(margins: Mapping[str, float], sd: Optional[Mapping[str, float]]) -> Tuple[str, bool]:
    """``margins`` in words, each with the cell's 3-seed sd when known, e.g. ``"FR misses by 0.003 (3-seed
    sd 0.012), IoU clears by 0.051 (3-seed sd 0.014): borderline"``; borderline when a margin is within
    its sd (another seed may well flip that verdict).

    Returns:
        ``(text, borderline)``.
    """
    parts, borderline = [], False
    for part, m in margins.items():
        text = f"{part} {'clears' if m >= 0 else 'misses'} by {abs(m):.3f}"
        if sd and sd.get(part) is not None:
            text += f" (3-seed sd {sd[part]:.3f})"
            borderline = borderline or abs(m) <= sd[part]
        parts.append(text)
    return ", ".join(parts) + (": borderline" if borderline else ""), borderline


def headline_checks(
    results: List[Dict[str, Any]], spread: Optional[Mapping[str, Mapping[str, float]]] = None
) -> List[Dict[str, Any]]:
    """The paper's headline for each JUAP cell (its own interpreter): FR >= GUAP's - 0.05, IoU >= GUAP's
    + 0.1, L1 lower than GUAP's; each with its figures, whether it holds, its signed distance from the
    thresholds (``margins``) and, from ``spread`` (:func:`claims_spread`), the cell's 3-seed sd."""
    own = {(r["method"], r["interpreter"]): r for r in main_rows(results)}
    checks = []
    for (method, interp), j in own.items():
        g = own.get(("GUAP", interp))
        if not method.endswith("JUAP") or g is None:
            continue
        misses = headline_misses(j, g)
        margins = headline_margins(j, g)
        sd = dict((spread or {}).get(j["variant"], {})) or None
        distance, borderline = threshold_distance(margins, sd)
        checks.append(
            {
                "claim": f"{j['variant']} vs GUAP",
                "holds": not misses,
                "figures": f"FR {j['fooling_ratio']:.3f} vs {g['fooling_ratio']:.3f}, IoU {j['iou']:.3f} vs "
                f"{g['iou']:.3f}, L1 {j['l1']:.3f} vs {g['l1']:.3f}"
                + (f" (misses: {', '.join(misses)})" if misses else ""),
                "margins": margins,
                "sd": sd,
                "distance": distance,
                "borderline": borderline,
            }
        )
    return checks


def verdict_line(check: Mapping[str, Any]) -> str:
    """One headline check as the demo prints it: verdict, figures, and how far from the thresholds."""
    return f"[{_verdict(check)}] {check['claim']}: {check['figures']}; {check['distance']}"


def _verdict(check: Mapping[str, Any]) -> str:
    return "holds" if check["holds"] else "does not hold"


def _jap_vs_pgd(clf, interps, x, y, exp: ExperimentConfig, jap_steps: int) -> List[Dict[str, Any]]:
    """Table IV on ``x``: PGD and JAP (``jap_steps`` steps) with the experiment's parameters and budget."""
    budget = exp.grid.budgets[0]
    common = dict(classifier=clf, norm=budget.norm, eps=budget.eps, seed=exp.seed)
    rows = []
    pgd = create_attack("pgd", **{**exp.attack_params.get("pgd", {}), **common})
    ev = evaluate(clf, pgd, [(x, y)], interpreters=interps)
    for iname, m in ev["interpreters"].items():
        rows.append(_row("PGD", iname, ev, m))
    for iname in ("cam", "gradcam"):
        params = {**exp.attack_params.get("jap", {}), "steps": jap_steps}
        jap = create_attack("jap", interpreter=interps[iname], **{**params, **common})
        ev = evaluate(clf, jap, [(x, y)], interpreters={iname: interps[iname]})
        rows.append(_row("JAP", iname, ev, ev["interpreters"][iname]))
    return rows


def _row(method: str, interp: str, ev: Mapping[str, Any], m: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "method": method,
        "interpreter": interp,
        "fooling_ratio": ev["fooling_ratio"],
        "l1": m["l1"],
        "iou": m["iou"],
    }


def _cell_lookup(shown: List[Dict[str, Any]]) -> Callable[[str, str, str], Any]:
    """``cell(method, interpreter, key)``: the figure of that row of ``shown`` (None when missing)."""
    rows = {(r["method"], r["interpreter"]): r for r in reversed(shown)}  # the first row wins
    return lambda method, interp, key: rows[(method, interp)][key] if (method, interp) in rows else None


def _results_markdown(results, shown, methods, claims, jap_rows, budget) -> List[str]:
    """The sections of results.md, in reading order (the transitions section is added by the caller)."""
    cell = _cell_lookup(shown)
    md = [
        f"# juap demo results\n\nEmbedded synthetic data, {budget.norm} eps={budget.eps:g} (0-255 units). "
        "Fooling ratio "
        "(eq 18), L1 (eq 19, lower = maps kept) and mean top-k IoU (eq 20, higher = maps kept) on held-out "
        "images, computed with the unmodified classifier and interpreters.\n",
        "## The paper's headline: does JUAP keep GUAP's fooling ratio and the maps?\n\n"
        f"Each JUAP perturbation against the interpreter it was trained against; it holds when its fooling "
        f"ratio is at least GUAP's - {FR_GAP}, its mean IoU at least GUAP's + {IOU_GAIN} and its L1 lower. "
        "One seed here; `benchmarks/bench_claims.py` measures the same with 3 seeds: each line says how far "
        "it is from the thresholds, beside that benchmark's 3-seed sd of the cell (borderline: within it).\n",
        "\n".join(f"- **{_verdict(c)}** — {c['claim']}: {c['figures']}; {c['distance']}" for c in claims)
        + "\n",
        "## Table II — fooling ratio\n",
        markdown_table(
            ["method"] + [INTERPRETER_CLASSES.get(i).label for i in INTERPRETERS],
            [[m] + [cell(m, i, "fooling_ratio") for i in INTERPRETERS] for m in methods],
        ),
        "\n## Table III — map discrepancy (L1 / IoU)\n",
        markdown_table(
            ["method"] + [f"{i} L1" for i in INTERPRETERS] + [f"{i} IoU" for i in INTERPRETERS],
            [
                [m] + [cell(m, i, "l1") for i in INTERPRETERS] + [cell(m, i, "iou") for i in INTERPRETERS]
                for m in methods
            ],
        ),
        f"\nRandom-map IoU floor: {results[0]['random_iou']:.3f}.\n",
        "\n### As applied in 8 bits\n\nEach perturbation as saved in `perturbation.png`: whole 0-255 steps "
        "(within the budget), added to the 8-bit test images and clipped; the maps under the interpreter "
        "each row is measured with.\n",
        markdown_table(
            ["perturbation", "interpreter", "FR", "FR (8-bit)", "IoU", "IoU (8-bit)", "L1", "L1 (8-bit)"],
            [
                [r["variant"], r["interpreter"], r["fooling_ratio"], r.get("fooling_ratio_8bit"), r["iou"],
                 r.get("iou_8bit"), r["l1"], r.get("l1_8bit")]
                for r in results
                if r.get("iou_8bit") is not None
            ],
        ),  # fmt: skip
        "\n### Table III on the fooled images only\n\nAn image the perturbation does not fool keeps its "
        "class, so its map mostly stays: the means above rise as the fooling ratio falls. Here only the "
        "images whose prediction changed count (what an inspector sees on a successful attack).\n",
        markdown_table(
            ["method"] + [f"{i} L1" for i in INTERPRETERS] + [f"{i} IoU" for i in INTERPRETERS],
            [
                [m]
                + [cell(m, i, "l1_fooled") for i in INTERPRETERS]
                + [cell(m, i, "iou_fooled") for i in INTERPRETERS]
                for m in methods
            ],
        ),
        "\n## Table IV — image-dependent: JAP vs PGD\n",
        markdown_table(
            ["method", "interpreter", "fooling ratio", "L1", "IoU"],
            [[r["method"], r["interpreter"], r["fooling_ratio"], r["l1"], r["iou"]] for r in jap_rows],
        ),
        "\n## Transfer — every perturbation against every interpreter\n",
        markdown_table(
            ["perturbation", "interpreter", "fooling ratio", "L1", "IoU"],
            [[r["variant"], r["interpreter"], r["fooling_ratio"], r["l1"], r["iou"]] for r in results],
        ),
        "\n![figure](figure.png)\n\n![discrepancy](discrepancy.png)\n",
    ]
    return md


# Methods an inspector may use that no demo attack trained against (cheap ones: one or two passes per image)
DEMO_PEERS = ("pgc:gradcam++", "pgc:layercam", "pgc:eigencam", "captum:saliency")


def _peer_section(run_dir: Path, clf, perturbations, x_test) -> str:
    """IoU of every perturbation's maps under :data:`DEMO_PEERS` (``transfer_peers.csv``), as a section of
    results.md; one line instead when pytorch-grad-cam or Captum is not installed."""
    title = "\n## Maps under methods no attack trained against (pytorch-grad-cam, Captum)\n"
    try:
        peers = {n: build_interpreter(n, clf) for n in DEMO_PEERS}
    except ConfigError as e:
        return f"{title}\nNot measured: {e}\n"
    rows = []
    for (method, against), n_hat in perturbations.items():
        ev = evaluate(clf, n_hat, x_test, interpreters=peers, batch_size=100)
        label = method if against == "-" else f"{method}-{INTERPRETER_CLASSES.get(against).label}"
        for name, m in ev["interpreters"].items():
            rows.append({"perturbation": label, "interpreter": name, "fooling_ratio": ev["fooling_ratio"],
                         "l1": m["l1"], "iou": m["iou"]})  # fmt: skip
    columns = ("perturbation", "interpreter", "fooling_ratio", "l1", "iou")
    write_csv(run_dir / "transfer_peers.csv", rows, columns=columns)
    labels = list(dict.fromkeys(r["perturbation"] for r in rows))
    iou = {(r["perturbation"], r["interpreter"]): r["iou"] for r in rows}
    note = (
        "Mean top-k IoU of the benign and the adversarial map under methods an inspector may use instead; "
        "each JUAP row was trained against the interpreter in its name only. The full table, every method "
        "and the faithfulness of the maps: `benchmarks/bench_peer_maps.py`.\n"
    )
    table = markdown_table(
        ["perturbation", *DEMO_PEERS], [[lab, *(iou[(lab, n)] for n in DEMO_PEERS)] for lab in labels]
    )
    return title + "\n" + note + "\n" + table


def _write_outputs(
    run_dir: Path, results, claims, jap_rows, perturbations, clf, interps, x_test, classes, budget
) -> None:
    # results.csv: one row per method x interpreter (JUAP: the perturbation trained against that interpreter)
    shown = main_rows(results)
    write_csv(run_dir / "results.csv", shown)
    write_csv(
        run_dir / "transfer.csv",
        results,
        columns=(
            "variant",
            "method",
            "generator",
            "trained_against",
            "interpreter",
            "fooling_ratio",
            "l1",
            "iou",
            "cell",
        ),
    )
    methods = list(dict.fromkeys(r["method"] for r in shown))  # the grid's order: UAP, SGD-UAP, GUAP, ...
    cell = _cell_lookup(shown)
    md = _results_markdown(results, shown, methods, claims, jap_rows, budget)
    # where the fooled images go: GUAP vs R-JUAP (CAM)
    moved = {
        label: evaluate(clf, perturbations[key], x_test, per_class=True)["transitions"]
        for label, key in (("GUAP", ("GUAP", "-")), ("R-JUAP (CAM)", ("R-JUAP", "cam")))
    }
    md.append(transition_section(run_dir, moved, classes))
    md.append(_peer_section(run_dir, clf, perturbations, x_test))
    write_text(run_dir / "results.md", "\n".join(md))

    for r in {r["variant"]: r for r in results}.values():  # each cell's perturbation, named R-JUAP-CAM etc.
        n = perturbations[(r["method"], r["trained_against"])]
        recorded = {k: r.get(k) for k in ("fooling_ratio", "fooling_ratio_8bit", "interpreter", "iou", "l1")}
        provenance = perturbation_provenance(clf, input_size=tuple(n.shape[-2:]), metrics=recorded)
        save_perturbation(
            run_dir / "perturbations" / r["variant"], n, attack=r["attack"], norm=r["norm"], eps=r["eps"],
            provenance=provenance,
        )  # fmt: skip

    _figure(run_dir / "figure.png", perturbations, clf, interps, x_test[:1], classes)
    bar_chart(
        run_dir / "discrepancy.png",
        groups=list(INTERPRETERS),
        series={m: [cell(m, i, "l1") or 0.0 for i in INTERPRETERS] for m in methods},
        ylabel="map L1 (lower: maps kept)",
        title="map discrepancy per interpreter (Fig. 5 style)",
    )


def _figure(path: Path, perturbations, clf, interps, x: torch.Tensor, classes) -> None:
    """Fig. 4 style: one held-out image ``x`` (1, 3, H, W) under UAP, GUAP and R-JUAP, with its maps."""
    rows = []
    with torch.no_grad():
        bpred = int(clf(x).argmax(1))
        for iname in INTERPRETERS:
            bmap = interps[iname](x, torch.tensor([bpred]))[0]
            for method, against in (("UAP", "-"), ("GUAP", "-"), ("R-JUAP", iname)):
                xa = apply_perturbation(x, perturbations[(method, against)])
                apred = int(clf(xa).argmax(1))
                rows.append(
                    {
                        "label": f"{method} / {iname}",
                        "x_adv": xa[0],
                        "benign_map": bmap,
                        "adv_map": interps[iname](xa, torch.tensor([apred]))[0],
                        "benign_pred": bpred,
                        "adv_pred": apred,
                    }
                )
    figure_grid(
        path,
        image=x[0],
        rows=rows,
        class_names=classes,
        title="benign vs adversarial maps (JUAP trained against each row's interpreter)",
    )
