"""``juap run EXPERIMENT.yaml``: a grid of attack cells, resumable, shardable, with the paper's tables.

An experiment file names the data, the evaluation and, under ``grid``, the axes to cross: attacks x
generators x interpreters x budgets (norm, eps) x objectives x classifiers x variants (extra attack
hyperparameters, e.g. a lambda sweep). An axis only multiplies the attacks it applies to: UAP, GUAP and
PGD take no interpreter, so they make one cell each, evaluated against every interpreter (the paper
reports one fooling ratio for them); JUAP and JAP make one cell per interpreter.

Each cell is an ordinary ``juap attack`` run in ``<out>/cells/<id>/`` whose id hashes the cell's whole
config, so a re-run skips every finished cell (a long grid can be stopped and continued), a changed
hyperparameter makes a new cell, and ``--shard i/n`` splits the cells across jobs whose results merge
into one table (same ``--out``, or ``--merge`` of several folders).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from .. import ATTACKS, CLASSIFIERS, GENERATORS, INTERPRETERS, __version__
from ..app.report import bar_chart, markdown_table, write_csv
from ..app.runs import failed_on_error, new_run_dir, reopen_run_dir
from ..classifiers import create_classifier, save_classifier
from ..errors import ConfigError
from ..metrics import FAITHFULNESS_KEYS
from ..runtime import distributed
from ..runtime.checkpoint import CHECKPOINT_NAME
from ..runtime.config import apply_overrides, check_range, config_hash, from_dict, read_yaml_mapping, to_dict
from ..runtime.io import write_text
from .attack import AttackRunConfig, run_attack
from .build import attack_param_names
from .configs import (
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    EvalConfig,
    InterpreterConfig,
    attack_split_data,
    check_checkpoints,
    learned_interpreters,
    migrate_legacy_keys,
)
from .demo_models import demo_models

log = logging.getLogger(__name__)

OBJECTIVE_LABELS = {"untargeted": "CE", "least_likely": "Cmin", "targeted": "Ct"}
DEMO = "demo"  # classifier.weights / a checkpoints value: the cached demo models of `juap demo`


# -- the experiment file ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """One threat model: ``norm`` and ``eps`` in 0-255 units (eq 6)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 10.0

    def __post_init__(self) -> None:
        check_range("grid.budgets.eps", self.eps, low=0, low_open=True)


@dataclasses.dataclass(frozen=True)
class GridClassifierConfig(ClassifierConfig):
    """A classifier of the grid: ``weights: demo`` is the cached demo classifier (trained on first use);
    ``checkpoints`` maps each learned interpreter (``requires_checkpoint``) to its model trained for this
    classifier (``demo``: the demo's), e.g. ``{rts: runs/rts/rts.safetensors}``."""

    label: Optional[str] = None
    checkpoints: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_checkpoints(f"grid.classifiers[{self.label or self.name}].checkpoints", self.checkpoints)


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """The axes crossed by ``juap run``; each applies only to the attacks that take it."""

    attacks: Tuple[str, ...] = ("uap", "guap", "juap")
    generators: Tuple[str, ...] = ("resnet",)
    interpreters: Tuple[str, ...] = ("cam", "gradcam")
    budgets: Tuple[BudgetConfig, ...] = (BudgetConfig(),)
    objectives: Tuple[str, ...] = ("least_likely",)
    classifiers: Tuple[GridClassifierConfig, ...] = (GridClassifierConfig(),)
    variants: Tuple[Dict[str, Any], ...] = ({},)  # extra attack params, e.g. [{lam: 0.01}, {lam: 0.1}]

    def __post_init__(self) -> None:
        for name in ("attacks", "generators", "interpreters", "budgets", "objectives", "classifiers"):
            if not getattr(self, name):
                raise ConfigError(f"grid.{name} is empty; give at least one value")


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """One result table: ``rows`` x ``columns`` (fields of a result row), one sub-column per value.

    Fields: classifier, method (R-JUAP), variant (R-JUAP-CAM), generator, interpreter, trained_against,
    budget (linf-10), norm, objective, setting (the variant's extra params). Values: fooling_ratio, l1,
    iou, random_iou, l1_fooled, iou_fooled, target_success_rate, clean_accuracy, adversarial_accuracy, and
    with ``evaluate.faithfulness`` deletion_benign, deletion_adversarial, insertion_benign,
    insertion_adversarial. ``where`` keeps rows whose
    field is one of the given values, e.g. ``{method: [PGD, JAP]}``.
    """

    title: str = "Fooling ratio"
    rows: Tuple[str, ...] = ("classifier", "variant")
    columns: Tuple[str, ...] = ()
    values: Tuple[str, ...] = ("fooling_ratio",)
    where: Dict[str, Any] = dataclasses.field(default_factory=dict)


DEFAULT_TABLES = (
    TableConfig(title="Table II - fooling ratio"),
    TableConfig(
        title="Table III - map discrepancy (L1 lower and IoU higher: maps kept)",
        rows=("classifier", "method"),
        columns=("interpreter",),
        values=("l1", "iou"),
    ),
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A ``juap run`` experiment: shared settings, per-attack hyperparameters, the grid and its tables."""

    name: str = "experiment"
    description: str = ""
    data: DataConfig = dataclasses.field(default_factory=attack_split_data)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    attack_params: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    # per interpreter, hyperparameters of the attacks that take one (e.g. {rts: {lam: 0.01}}): the
    # paper tunes lambda per interpreter; applied over attack_params, under the grid's variants
    interpreter_params: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    val_fraction: float = 0.1
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    tables: Tuple[TableConfig, ...] = DEFAULT_TABLES
    seed: int = 0
    device: str = "auto"


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment file (following ``extends:`` to a base file), apply overrides, validate.

    An old key (``rts_checkpoint``) is moved to its new place (``checkpoints``) with a FutureWarning."""
    raw = _read_with_extends(Path(path), seen=())
    raw = migrate_legacy_keys(apply_overrides(raw, overrides))
    exp = from_dict(ExperimentConfig, raw)
    plan(exp)  # every name resolves now, before any work
    return exp


def _read_with_extends(path: Path, seen: Tuple[Path, ...]) -> Dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    raw = read_yaml_mapping(path, what="experiment file")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    parent = _read_with_extends(path.parent / base, seen + (path.resolve(),))
    return _merge(parent, raw)


def _merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """Deep-merge mappings (``top`` wins); lists are replaced, not concatenated."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# -- the plan -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell: an attack run with fixed choices on every axis."""

    id: str
    classifier: GridClassifierConfig
    attack: str
    budget: BudgetConfig
    generator: Optional[str]
    interpreter: Optional[str]
    objective: Optional[str]
    setting: Dict[str, Any]
    params: Dict[str, Any]
    method: str
    variant: str

    @property
    def classifier_label(self) -> str:
        return self.classifier.label or self.classifier.name

    def describe(self) -> str:
        return f"{self.classifier_label} {self.variant} {self.budget.norm} eps={self.budget.eps:g}"


def plan(exp: ExperimentConfig, *, data_key: Optional[Mapping[str, Any]] = None) -> List[Cell]:
    """Every cell of the grid, in a stable order; unknown names fail here with the known ones listed.

    ``data_key`` names the images when a caller's ``run_cell`` runs the cells on data of its own rather
    than ``exp.data`` (e.g. a split it drew itself); it joins every cell's id."""
    _check_names(exp)
    cells: List[Cell] = []
    for clf, budget, attack in itertools.product(exp.grid.classifiers, exp.grid.budgets, exp.grid.attacks):
        cells += _attack_cells(exp, clf, budget, attack, data_key)
    return cells


def _check_names(exp: ExperimentConfig) -> None:
    """Every name of the experiment resolves, and the classifiers' labels differ."""
    g = exp.grid
    for name in g.generators:
        GENERATORS.get(name)
    for name in g.interpreters:
        INTERPRETERS.get(name)
    for c in g.classifiers:
        CLASSIFIERS.get(c.name)
    for obj in g.objectives:
        if obj not in OBJECTIVE_LABELS:
            raise ConfigError(
                f"grid.objectives: {obj!r} is not allowed; allowed: {', '.join(OBJECTIVE_LABELS)}"
            )
    for name in exp.interpreter_params:
        INTERPRETERS.get(name)
    for name in exp.attack_params:
        if name not in g.attacks:
            ATTACKS.get(name)  # a typo in attack_params fails even if that attack is not in this grid
    labels = [c.label or c.name for c in g.classifiers]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"grid.classifiers: labels must differ, got {labels}; set label: for each")
    if exp.evaluate.checkpoints:  # a learned interpreter is trained per classifier
        raise ConfigError(
            "evaluate.checkpoints: in an experiment, give each classifier its learned interpreters' files "
            f"as grid.classifiers[i].checkpoints (here: {exp.evaluate.checkpoints})"
        )


def _attack_cells(
    exp: ExperimentConfig,
    clf: GridClassifierConfig,
    budget: BudgetConfig,
    attack: str,
    data_key: Optional[Mapping[str, Any]],
) -> List[Cell]:
    """The cells of one attack on one classifier at one budget: one per value of each axis it takes."""
    g = exp.grid
    cls = ATTACKS.get(attack)
    accepts = attack_param_names(cls)
    base = dict(exp.attack_params.get(attack, {}))
    unknown = sorted(set(base) - accepts)
    if unknown:
        raise ConfigError(
            f"attack_params.{attack}: unknown key(s) {unknown}; known: {', '.join(sorted(accepts))}"
        )
    # An axis applies to the attacks that take it, unless attack_params fixes the value.
    objectives = _objectives(cls, g) if _free("objective", accepts, base) else (None,)
    axes = itertools.product(
        g.generators if _free("generator", accepts, base) else (None,),
        g.interpreters if cls.takes_interpreter else (None,),
        objectives,
        [v for v in g.variants if set(v) <= accepts] or [{}],
    )
    cells = []
    for gen, interp, obj, setting in axes:
        if obj is not None and "objective" in setting:  # a variant that names its objective keeps it
            if obj != objectives[0]:
                continue  # once, not once per objective of the grid
            obj = setting["objective"]
        per_interp = exp.interpreter_params.get(interp, {}) if interp is not None else {}
        unknown = sorted(set(per_interp) - accepts)
        if unknown:
            raise ConfigError(
                f"interpreter_params.{interp}: unknown key(s) {unknown} for {attack}; "
                f"known: {', '.join(sorted(accepts))}"
            )
        params = {**base, **per_interp, **setting}
        if gen is not None:
            params["generator"] = gen
        if obj is not None:
            params["objective"] = obj
        method, variant = _labels(attack, gen, interp, obj, setting, g)
        key = {
            "juap": __version__,
            "data": to_dict(exp.data),
            "evaluate": _id_form(_measured(exp.evaluate)),
            "classifier": _id_form(dataclasses.asdict(clf)),
            "attack": attack,
            "budget": dataclasses.asdict(budget),
            "interpreter": interp,
            "params": _params_id_form(attack, params),
            "val_fraction": exp.val_fraction,
            "seed": exp.seed,
            **({"data_key": dict(data_key)} if data_key is not None else {}),
        }
        slug = _slug(f"{clf.label or clf.name}_{variant}_{budget.norm}{budget.eps:g}")
        cells.append(
            Cell(
                id=f"{slug}-{_hash(key)}",
                classifier=clf,
                attack=attack,
                budget=budget,
                generator=gen,
                interpreter=interp,
                objective=obj,
                setting=dict(setting),
                params=params,
                method=method,
                variant=variant,
            )
        )
    return cells


def _params_id_form(attack: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    """An attack's hyperparameters as a cell's id hashes them: a renamed one under its old name (the name
    the first cells recorded, e.g. ``rts_feature_weight``), so that those cells are still found."""
    old = {new: name for name, new in getattr(ATTACKS.get(attack), "renamed", {}).items()}
    return {old.get(k, k): v for k, v in params.items()}


def _id_form(section: Dict[str, Any]) -> Dict[str, Any]:
    """A config section as a cell's id hashes it: ``checkpoints`` written as the ``<name>_checkpoint``
    keys of the configs that recorded the first cells (one per learned interpreter, null when not given),
    so that the cells run before ``checkpoints`` existed are still found and reused."""
    out = {k: v for k, v in section.items() if k != "checkpoints"}
    given = section.get("checkpoints") or {}
    out.update({f"{name}_checkpoint": given.get(name) for name in learned_interpreters()})
    return out


# What only changes a cell's pictures, not its figures: left out of the cell's id, so that a cell run
# before the key existed (or with another picture choice) is still found and reused.
_PICTURE_KEYS = ("figure_images", "figure_count")


# evaluate options that came after the first recorded cells: at their default they leave the ids as before
_LATER_OPTIONS = {"transforms": (), "faithfulness": 0, "faithfulness_baseline": "blur"}


def _measured(evaluate: EvalConfig) -> Dict[str, Any]:
    out = {k: v for k, v in to_dict(evaluate).items() if k not in _PICTURE_KEYS}
    for key, default in _LATER_OPTIONS.items():
        if key in out and out[key] == default:
            out.pop(key)
    return out


def _objectives(cls: type, g: GridConfig) -> Tuple[Optional[str], ...]:
    """The grid's objectives that the attack class supports (``objectives`` on the class, default all)."""
    return tuple(o for o in g.objectives if o in getattr(cls, "objectives", OBJECTIVE_LABELS)) or (None,)


def _free(name: str, accepts: set, fixed: Mapping[str, Any]) -> bool:
    return name in accepts and name not in fixed


def _labels(attack, gen, interp, obj, setting, g: GridConfig) -> Tuple[str, str]:
    """The paper's names: method ``R-JUAP``, variant ``R-JUAP-CAM`` (plus objective / setting suffixes)."""

    cls = ATTACKS.get(attack)
    method = cls.label
    if cls.generator_in_label == "prefix" and gen is not None:
        method = f"{getattr(GENERATORS.get(gen), 'label', None) or gen}-{method}"
    elif gen is not None and len(g.generators) > 1 and cls.generator_in_label == "suffix":
        method = f"{method}-{gen}"
    variant = method if interp is None else f"{method}-{INTERPRETERS.get(interp).label}"
    if obj is not None and len(g.objectives) > 1:
        variant += f"-{OBJECTIVE_LABELS[obj]}"
    if setting and len(g.variants) > 1:
        variant += " [" + ", ".join(f"{k}={v}" for k, v in setting.items()) + "]"
    return method, variant


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", s).strip("_")[:80]


def _hash(obj: Any) -> str:
    return config_hash(obj)[:10]


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) -> (i, n); None -> (1, 1)."""
    if text is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--shard {text!r} must look like i/n, e.g. --shard 1/4 (the first of 4 jobs)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: the index must be between 1 and {max(n, 1)} (got {i}/{n})")
    return i, n


# -- running ------------------------------------------------------------------------------------------
def cell_config(
    exp: ExperimentConfig, cell: Cell, *, cache_dir=None, progress: bool = True
) -> AttackRunConfig:
    """The ``juap attack`` config of a cell, with ``demo`` weights resolved to the cached demo models."""
    clf = cell.classifier
    weights, ckpts = clf.weights, dict(clf.checkpoints)
    if weights == DEMO or DEMO in ckpts.values():  # the demo ships one learned interpreter's model
        learned = DEMO in ckpts.values()
        demo_clf, demo_interp = demo_models(cache_dir=cache_dir, learned=learned, progress=progress)
        weights = demo_clf if weights == DEMO else weights
        ckpts = {n: demo_interp if p == DEMO else p for n, p in ckpts.items()}
    learned = set(learned_interpreters())
    for name in dict.fromkeys(filter(None, [cell.interpreter, *exp.evaluate.interpreters])):
        if name in learned and not ckpts.get(name):
            raise ConfigError(
                f"grid.classifiers[{cell.classifier_label}]: the {INTERPRETERS.get(name).label} interpreter "
                f"is a learned model; give its file trained for this classifier as checkpoints: "
                f"{{{name}: PATH}} (or {DEMO} with the demo classifier)"
            )
    return AttackRunConfig(
        data=exp.data,
        classifier=ClassifierConfig(
            name=clf.name,
            weights=weights,
            num_classes=clf.num_classes,
            reset_head=clf.reset_head,
            options=clf.options,
        ),
        interpreter=InterpreterConfig(
            name=cell.interpreter, checkpoint=ckpts.get(cell.interpreter) if cell.interpreter else None
        ),
        attack=AttackConfig(
            name=cell.attack,
            norm=cell.budget.norm,
            eps=cell.budget.eps,
            params=dict(cell.params),
            val_fraction=exp.val_fraction,
        ),
        evaluate=dataclasses.replace(
            exp.evaluate,
            interpreters=tuple(i for i in exp.evaluate.interpreters if i not in learned),
            checkpoints=ckpts,  # each learned interpreter given joins the table (build.eval_interpreters)
        ),
        seed=exp.seed,
        device=exp.device,
    )


def cell_status(cell_dir: Path) -> Optional[str]:
    run = cell_dir / "run.json"
    if not run.is_file():
        return None
    try:
        return json.loads(run.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def run_grid(
    exp: ExperimentConfig,
    run_dir: Path,
    *,
    shard: Tuple[int, int] = (1, 1),
    merge: Sequence[Path] = (),
    cache_dir=None,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
    run_cell: Optional[Callable[..., Dict[str, Any]]] = None,
    data_key: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Run this shard's unfinished cells into ``run_dir/cells``, then write the tables of every finished
    cell found there (and in ``merge`` folders).

    ``run_cell(cfg, cell_dir, resume=False) -> metrics`` runs one cell (default: ``juap attack``); one
    that runs on images other than ``exp.data`` names them by ``data_key`` (see :func:`plan`).

    Returns:
        ``{"cells": N, "complete": k, "ran": r, "rows": [...]}``.
    """

    run_cell = run_cell or (lambda cfg, d, resume=False: run_attack(cfg, d, progress=progress, resume=resume))
    cells = plan(exp, data_key=data_key)
    i, n = shard
    mine = [c for k, c in enumerate(cells) if k % n == i - 1]
    cells_dir = run_dir / "cells"
    ran = 0
    for k, cell in enumerate(mine, 1):
        d = cells_dir / cell.id
        head = f"[{k}/{len(mine)}] {cell.describe():<50}"
        if distributed.broadcast_object(_finished(d, merge, cell.id)):  # rank 0 decides for all
            say(f"{head} done earlier, reused")
            continue
        t0 = time.perf_counter()
        cfg = cell_config(exp, cell, cache_dir=cache_dir, progress=progress)
        resume = (d / CHECKPOINT_NAME).is_file() and cell_status(d) in ("running", "interrupted", "failed")
        resume = distributed.broadcast_object(resume)
        if resume:  # an interrupted cell continues from its last checkpoint (JUAP, GUAP)
            reopen_run_dir(d, command="attack")
            head += " (resumed)"
        else:  # an unfinished cell without a checkpoint starts again
            new_run_dir(d, command="attack", overwrite=True)
        with failed_on_error(d):
            m = run_cell(cfg, d, resume=resume)
        ran += 1
        say(
            f"{head} fooling ratio {m.get('fooling_ratio', float('nan')):.3f}{_map_note(m)}  "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    rows, complete = collect_rows(cells, [cells_dir, *[Path(p) / "cells" for p in merge]])
    return {"cells": len(cells), "complete": complete, "ran": ran, "shard": list(shard), "rows": rows}


def _finished(d: Path, merge: Sequence[Path], cell_id: str) -> bool:
    return any(_done(f) for f in [d, *(_same_cell(Path(p) / "cells", cell_id) for p in merge)])


def _done(d: Optional[Path]) -> bool:
    return d is not None and cell_status(d) == "complete" and (d / "metrics.json").is_file()


def _same_cell(folder: Path, cell_id: str) -> Optional[Path]:
    """The cell ``cell_id`` in ``folder``: by its exact name, else by its config hash alone (the same
    configuration named after another experiment's labels, e.g. a lambda-sweep point)."""
    exact = folder / cell_id
    if exact.is_dir():
        return exact
    return next((d for d in sorted(folder.glob(f"*-{cell_id.rsplit('-', 1)[-1]}")) if _done(d)), None)


def _map_note(m: Mapping[str, Any]) -> str:
    if m.get("iou") is None:
        return ""
    return f", {m.get('map_interpreter')} IoU {m['iou']:.3f} L1 {m['l1']:.3f}"


def collect_rows(cells: Sequence[Cell], folders: Sequence[Path]) -> Tuple[List[Dict[str, Any]], int]:
    """Result rows (one per finished cell x evaluated interpreter) and the number of finished cells.

    Under torchrun rank 0 reads the folders and the other ranks get its result (they may run ahead of
    rank 0's last writes)."""
    if not distributed.is_main():
        return distributed.broadcast_object(None)
    rows: List[Dict[str, Any]] = []
    complete = 0
    for cell in cells:
        for folder in folders:
            d = _same_cell(folder, cell.id)
            if _done(d):
                rows += cell_rows(cell, json.loads((d / "metrics.json").read_text()), d)
                complete += 1
                break
    return distributed.broadcast_object((rows, complete))


def cell_rows(cell: Cell, m: Mapping[str, Any], folder: Path) -> List[Dict[str, Any]]:
    """Long-format rows of one cell: one per interpreter it was evaluated with."""
    common = {
        "classifier": cell.classifier_label,
        "method": cell.method,
        "variant": cell.variant,
        "attack": cell.attack,
        "generator": cell.generator or "-",
        "trained_against": cell.interpreter or "-",
        "budget": f"{cell.budget.norm}-{cell.budget.eps:g}",
        "norm": cell.budget.norm,
        "eps": cell.budget.eps,
        "objective": cell.objective or "-",
        "setting": ", ".join(f"{k}={v}" for k, v in cell.setting.items()) or "-",
        "fooling_ratio": m.get("fooling_ratio"),
        "clean_accuracy": m.get("clean_accuracy"),
        "adversarial_accuracy": m.get("adversarial_accuracy"),
        "target_success_rate": m.get("target_success_rate"),
        "n_images": m.get("n_images"),
        "fooling_ratio_8bit": (m.get("as_8bit") or {}).get("fooling_ratio"),  # as saved in 8 bits
        "cell": cell.id,
        "folder": str(folder),
    }
    # per class (the benign prediction), by name when the cell knows them: fooling_ratio[circle], ...
    names = m.get("class_names") or [str(c) for c in range(m.get("num_classes") or 0)]
    label = {"dominant_label": m.get("dominant_label_name", m.get("dominant_label"))}
    common.update(label, dominant_label_share=m.get("dominant_label_share"))
    common.update(_by_class(m.get("per_class"), ("fooling_ratio", "n_images"), names))
    out = []
    q = m.get("as_8bit") or {}
    for iname, t in (m.get("transfer") or {}).items():
        mine = q.get("map_interpreter") == iname  # the 8-bit maps are measured for the main interpreter
        out.append(
            {
                **common,
                "interpreter": iname,
                "l1": t.get("l1"),
                "iou": t.get("iou"),
                "l1_8bit": q.get("l1") if mine else None,
                "iou_8bit": q.get("iou") if mine else None,
                "random_iou": t.get("random_iou"),
                "l1_fooled": t.get("l1_fooled"),
                "iou_fooled": t.get("iou_fooled"),
                **{k: t.get(k) for k in FAITHFULNESS_KEYS if k in t},  # evaluate.faithfulness
                **_by_class(t.get("per_class"), ("l1", "iou"), names),
            }
        )
    return out or [{**common, "interpreter": "-", "l1": None, "iou": None, "random_iou": None}]


def _by_class(per_class: Optional[Mapping[str, Sequence]], keys: Sequence[str], names: Sequence[str]) -> Dict:
    """``{"fooling_ratio[circle]": 0.8, ...}`` from metrics.json's ``per_class`` lists (indexed by class)."""
    if not per_class:
        return {}
    return {f"{k}[{n}]": v for k in keys for n, v in zip(names, per_class.get(k) or (), strict=False)}


def main_rows(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    """The rows the paper's tables show: an attack trained against an interpreter is reported with that
    interpreter; attacks without one (UAP, GUAP, PGD) with every interpreter."""
    return [r for r in rows if r["trained_against"] in ("-", r["interpreter"])]


def pivot(rows: Sequence[Mapping[str, Any]], table: TableConfig) -> Tuple[List[str], List[List[Any]]]:
    """Rows x columns of one table; the first row wins where several fill a cell (e.g. GUAP's fooling
    ratio, identical for every interpreter).

    A value ``name[*]`` stands for every per-class value of that name the rows hold, in class order:
    ``fooling_ratio[*]`` gives ``fooling_ratio[circle]``, ``fooling_ratio[cross]``, ... (classes are the
    benign predictions; also ``n_images[*]``, and per interpreter ``l1[*]``, ``iou[*]``).
    """
    keep = [r for r in rows if all(_matches(r.get(k), v) for k, v in table.where.items())]
    values: List[str] = []
    for v in table.values:
        if v.endswith("[*]"):
            found = dict.fromkeys(k for r in keep for k in r if k.startswith(v[:-2]) and k.endswith("]"))
            values += list(found)
        else:
            values.append(v)
    table = dataclasses.replace(table, values=tuple(values))
    row_keys: List[Tuple] = []
    col_keys: List[Tuple] = []
    cells: Dict[Tuple[Tuple, Tuple], Mapping[str, Any]] = {}
    for r in keep:
        rk = tuple(r.get(f) for f in table.rows)
        ck = tuple(r.get(f) for f in table.columns)
        if rk not in row_keys:
            row_keys.append(rk)
        if ck not in col_keys:
            col_keys.append(ck)
        cells.setdefault((rk, ck), r)
    header = list(table.rows)
    for ck in col_keys:
        for v in table.values:
            header.append(" ".join([*map(str, ck), _VALUE_LABELS.get(v, v)]).strip())
    body = []
    for rk in row_keys:
        line: List[Any] = list(rk)
        for ck in col_keys:
            r = cells.get((rk, ck))
            line += [None if r is None else r.get(v) for v in table.values]
        body.append(line)
    return header, body


_VALUE_LABELS = {
    "fooling_ratio": "FR",
    "l1": "L1",
    "iou": "IoU",
    "target_success_rate": "target success",
    "l1_fooled": "L1 (fooled)",
    "iou_fooled": "IoU (fooled)",
    "fooling_ratio_8bit": "FR (8-bit)",
    "l1_8bit": "L1 (8-bit)",
    "iou_8bit": "IoU (8-bit)",
}


def _matches(value: Any, allowed: Any) -> bool:
    return value in allowed if isinstance(allowed, (list, tuple)) else value == allowed


def write_results(exp: ExperimentConfig, run_dir: Path, result: Dict[str, Any]) -> None:
    """``results.md`` (the configured tables), ``results.csv`` / ``transfer.csv``, ``discrepancy.png``.

    Under torchrun only rank 0 writes them."""

    if not distributed.is_main():
        return

    rows = result["rows"]
    shown = main_rows(rows)
    write_csv(run_dir / "results.csv", shown, columns=RESULT_COLUMNS)
    write_csv(run_dir / "transfer.csv", rows, columns=RESULT_COLUMNS + ("trained_against", "cell"))
    md = [f"# {exp.name}\n"]
    if exp.description:
        md.append(exp.description.strip() + "\n")
    md.append(
        f"Data: {exp.data.name} at {exp.data.image_size}x{exp.data.image_size}; "
        f"{result['complete']} of {result['cells']} cells finished"
        + ("" if result["complete"] == result["cells"] else " (partial tables: run the grid again to finish)")
        + ". Fooling ratio (eq 18), L1 (eq 19) and mean top-k IoU (eq 20) on the test split, measured with "
        "the unmodified classifier and interpreters.\n"
    )
    for table in exp.tables:
        header, body = pivot(shown, table)
        md += [f"## {table.title}\n", markdown_table(header, body) if body else "(no finished cell)", ""]
    if rows:
        floors = sorted({round(r["random_iou"], 3) for r in rows if r.get("random_iou") is not None})
        if floors:
            md.append(f"Random-map IoU floor: {', '.join(f'{f:.3f}' for f in floors)}.\n")
        md.append(
            "Every perturbation against every interpreter: `transfer.csv`. Map discrepancy: "
            "![discrepancy](discrepancy.png)\n"
        )
        interps = list(dict.fromkeys(r["interpreter"] for r in shown if r.get("l1") is not None))
        methods = list(dict.fromkeys(r["method"] for r in shown if r.get("l1") is not None))
        if interps and methods:

            def l1(method, interp):
                return next(
                    (r["l1"] for r in shown if r["method"] == method and r["interpreter"] == interp), 0.0
                )

            bar_chart(
                run_dir / "discrepancy.png",
                groups=interps,
                series={m: [l1(m, i) or 0.0 for i in interps] for m in methods},
                ylabel="map L1 (lower: maps kept)",
                title=f"{exp.name}: map discrepancy per interpreter (Fig. 5 style)",
            )

    write_text(run_dir / "results.md", "\n".join(md))


RESULT_COLUMNS = (
    "method",
    "generator",
    "interpreter",
    "norm",
    "fooling_ratio",
    "l1",
    "iou",
    "classifier",
    "variant",
    "eps",
    "objective",
    "setting",
    "target_success_rate",
    "fooling_ratio_8bit",
    "l1_8bit",
    "iou_8bit",
    "random_iou",
    "l1_fooled",
    "iou_fooled",
) + FAITHFULNESS_KEYS


# -- dry runs -----------------------------------------------------------------------------------------
def dry_run_experiment(exp: ExperimentConfig, work_dir: Path) -> ExperimentConfig:
    """The same grid on tiny embedded data, untrained weights and one step per attack (each attack's
    declared dry-run sizes, :meth:`~juap.attacks.base.Attack.dry_run_params`): checks that every cell
    builds and runs end to end before hours are spent on the real one."""

    # the default data set (the embedded one), tiny
    data = DataConfig(image_size=32, num_images=36, train_fraction=0.5, test_fraction=0.5)
    used = set(exp.grid.interpreters) | set(exp.evaluate.interpreters)
    learned = [n for n in learned_interpreters() if n in used]
    classifiers = []
    for c in exp.grid.classifiers:
        weights, ckpts = None, {}
        if learned:  # an untrained model of each, for a classifier saved beside it
            torch.manual_seed(0)
            clf = create_classifier(c.name, num_classes=data.num_classes, **c.options)
            for name in learned:
                path = work_dir / f"{name}-{_slug(c.label or c.name)}.safetensors"
                INTERPRETERS.create(name, clf).save(path)
                ckpts[name] = str(path)
            weights = str(work_dir / f"classifier-{_slug(c.label or c.name)}.safetensors")
            save_classifier(clf, weights)
        classifiers.append(
            dataclasses.replace(c, weights=weights, num_classes=None, reset_head=False, checkpoints=ckpts)
        )

    params = {
        name: ATTACKS.get(name).dry_run_params(exp.attack_params.get(name, {}))
        for name in set(exp.grid.attacks) | set(exp.attack_params)
    }
    return dataclasses.replace(
        exp,
        data=data,
        evaluate=dataclasses.replace(exp.evaluate, batch_size=18, max_images=12, checkpoints={}),
        attack_params=params,
        # what is merged over attack_params (per interpreter, per variant) takes the dry-run sizes too
        interpreter_params={k: _dry_variant(v, exp.grid.attacks) for k, v in exp.interpreter_params.items()},
        grid=dataclasses.replace(
            exp.grid,
            classifiers=tuple(classifiers),
            variants=tuple(_dry_variant(v, exp.grid.attacks) for v in exp.grid.variants),
        ),
        device="cpu",
    )


def _dry_variant(variant: Mapping[str, Any], attacks: Sequence[str]) -> Dict[str, Any]:
    """Parameters merged over ``attack_params`` (a grid variant, an interpreter's), with the dry-run sizes
    too: a variant of ``steps: 600`` trains one step."""
    out = dict(variant)
    for name in attacks:
        cls = ATTACKS.get(name)
        dry = cls.dry_run_params({k: v for k, v in variant.items() if k in cls.hyperparams})
        out.update({k: dry[k] for k in variant if k in dry})
    return out
