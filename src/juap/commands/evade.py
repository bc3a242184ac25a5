"""`juap evade`: can a map-based inspector be evaded by a universal perturbation that knows it?

SPEC section 5. For every cell (seed x budget x interpreter):

* **Round 0** (non-adaptive): UAP, SGD-UAP, GUAP and R-JUAP are learned on the attack images; each
  detector kind is trained on clean detector-training images against the images those perturbations fool,
  and its threshold is calibrated on held-out clean images at ``evade.fpr``.
* **Round r** (adaptive): JUAP (and GUAP) are trained against round r-1's detector of each kind (its
  calibrated score enters the loss, :class:`~juap.attacks.parts.DetectorTerm`), starting from round 0's
  trained generator of the same attack (Tramer et al. 2020's two-phase loss: the non-adaptive attack is
  the fooling phase, the adaptive one adds the detector); then the detector is
  retrained on every perturbation so far plus the new ones. ``evade.rounds`` rounds at the headline budget,
  round 1 alone at the other budgets (the evasion-against-budget curve).
* **Measured** on the test images, for every detector of the cell against every perturbation of the cell:
  AUROC, TPR at 1% and at ``fpr``, the threshold, the fooling ratio and the *evasion rate* (fooled and not
  flagged). At the headline budget the sanity checks of Carlini et al. 2019 run too (doubled and halved
  steps, a restart, a noise control of the same norm).

Every perturbation and detector is saved as safetensors in its cell folder as soon as it exists, so a run
that is interrupted resumes where it stopped (run the same command again); ``--shard I/N`` runs every
N-th cell. The report (:mod:`juap.app.evasion_report`) is written from the finished cells.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import juap

from .._validate import check_range
from ..app.artifacts import load_generator
from ..app.evasion_report import write_evasion_report
from ..budget import apply_perturbation, check_budget
from ..data import data_set, load_splits, save_split, split_groups, to_tensors
from ..data.config import DataConfig
from ..errors import ConfigError
from ..metrics import auroc, evasion_rate, is_fooled, roc_curve, tpr_at_fpr
from ..runtime.config import apply_overrides, from_dict, read_yaml_mapping
from ..runtime.distributed import resolve_device
from ..runtime.io import load_tensors, save_tensors, write_json
from .build import build_classifier, build_interpreter, check_classes
from .configs import ClassifierConfig
from .demo_models import demo_models
from .run import DEMO, BudgetConfig
from .shipped import resolve_config

ROUND0 = ("uap", "sgd_uap", "guap", "juap")  # the non-adaptive perturbations every detector is trained on
ROUND0_LABELS = {"uap": "UAP", "sgd_uap": "SGD-UAP", "guap": "GUAP", "juap": "R-JUAP"}
ADAPTIVE = ("juap", "guap")


# -- configuration -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How the detector images (the data's test split) are divided, seeded, saved in split.json: ``train``
    trains the detectors, ``calibration`` sets their thresholds, the rest tests everything. By image, or by
    source where the data set groups its images (the photos: every crop of a photo in one part)."""

    train: float = 0.5
    calibration: float = 0.25

    def __post_init__(self) -> None:
        check_range("evade.split.train", self.train, low=0, high=1, low_open=True)
        check_range("evade.split.calibration", self.calibration, low=0, high=1, low_open=True)
        if self.train + self.calibration >= 1:
            raise ConfigError("evade.split.train + evade.split.calibration must leave images to test (< 1)")


@dataclasses.dataclass(frozen=True)
class EvadeSettings:
    """The experiment (``evade`` section).

    ``detectors``: registered detector kinds; ``budgets``: the sweep, ``headline``: the budget where the
    arms race runs all its ``rounds`` and the sanity checks run (it must be one of ``budgets``);
    ``fpr``: the operating point of the thresholds and the evasion rate; ``mu`` / ``temperature`` /
    ``mu_schedule``: the adaptive attacker's detector term (GeneratorUAP's); ``warm_start``: each adaptive
    attack starts from round 0's trained generator of its attack (R-JUAP's, GUAP's), else from scratch;
    ``adaptive_steps``: its steps (default: the attack's own); ``warmup_fraction``: the share of them
    trained without the detector term (fool first; 0 needs no warm-up after a warm start);
    ``adaptive_eval_every``: its validation period (each validation keeps the best evasion rate);
    ``adaptive_attacks``: ``juap`` and / or ``guap``; ``sanity``: run the sanity checks against these
    detector kinds (empty: none).
    """

    interpreters: Tuple[str, ...] = ("cam",)
    detectors: Tuple[str, ...] = ("map", "map_conf", "cnn", "hyperneuron")
    budgets: Tuple[BudgetConfig, ...] = (
        BudgetConfig("linf", 4.0),
        BudgetConfig("linf", 10.0),
        BudgetConfig("linf", 24.0),
        BudgetConfig("linf", 64.0),
    )
    headline: BudgetConfig = BudgetConfig("linf", 10.0)
    rounds: int = 3
    fpr: float = 0.05
    mu: float = 3.0
    temperature: float = 1.0
    mu_schedule: str = "ramp"
    warm_start: bool = True
    adaptive_steps: Optional[int] = None
    warmup_fraction: float = 0.0
    adaptive_eval_every: int = 10
    adaptive_attacks: Tuple[str, ...] = ADAPTIVE
    seeds: Tuple[int, ...] = (0,)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    sanity: Tuple[str, ...] = ("map_conf",)
    detector_params: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ConfigError(
                "evade.budgets is empty: give at least one budget, e.g. [{norm: linf, eps: 10}]"
            )
        for b in self.budgets:
            check_budget(b.norm, b.eps)
        if self.headline not in self.budgets:
            raise ConfigError(
                f"evade.headline ({self.headline.norm} {self.headline.eps:g}) must be one of evade.budgets"
            )
        if not isinstance(self.fpr, (int, float)) or not 0 < self.fpr < 1:
            raise ConfigError(
                f"evade.fpr = {self.fpr!r} is out of range: a false-positive rate in (0, 1), e.g. 0.05"
            )
        check_range("evade.rounds", self.rounds, low=0)
        check_range("evade.mu", self.mu, low=0, low_open=True)
        check_range("evade.temperature", self.temperature, low=0, low_open=True)
        check_range("evade.warmup_fraction", self.warmup_fraction, low=0, high=1)
        check_range("evade.adaptive_eval_every", self.adaptive_eval_every, low=1)
        if self.adaptive_steps is not None:
            check_range("evade.adaptive_steps", self.adaptive_steps, low=1)
        if self.mu_schedule not in ("constant", "ramp"):
            raise ConfigError(f"evade.mu_schedule must be 'constant' or 'ramp', got {self.mu_schedule!r}")
        check_range("evade.batch_size", self.batch_size, low=1)
        if not self.interpreters or not self.detectors or not self.seeds:
            raise ConfigError("evade.interpreters, evade.detectors and evade.seeds must not be empty")
        for name in self.interpreters:
            if juap.INTERPRETERS.get(name).evaluation_only:  # an unknown name lists the known ones
                raise ConfigError(
                    f"evade.interpreters: {name!r} is evaluation-only; the attack trains against these maps: "
                    "use cam, gradcam or rts"
                )
        for name in (*self.detectors, *self.sanity, *self.detector_params):
            juap.DETECTORS.get(name)
        bad = [a for a in self.adaptive_attacks if a not in ADAPTIVE]
        if bad or not self.adaptive_attacks:
            raise ConfigError(
                f"evade.adaptive_attacks must be a non-empty subset of {list(ADAPTIVE)}, got {bad}"
            )
        if any(d not in self.detectors for d in self.sanity):
            raise ConfigError("evade.sanity names detectors that are not in evade.detectors")


@dataclasses.dataclass(frozen=True)
class EvadeConfig:
    """``juap evade``'s experiment file: the data (its train split learns the perturbations, its test split
    is divided for the detectors), the classifier (``weights: demo``: the shipped demo classifier), the
    learned interpreters' files (``checkpoints: {rts: demo}``), the attacks' hyperparameters (per attack,
    and per interpreter for JUAP) and the ``evade`` settings."""

    name: str = "evasion"
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(train_fraction=0.2, test_fraction=0.2)
    )
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    checkpoints: Dict[str, str] = dataclasses.field(default_factory=dict)
    attack_params: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    interpreter_params: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    evade: EvadeSettings = dataclasses.field(default_factory=EvadeSettings)
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_range("val_fraction", self.val_fraction, low=0, high=1)
        bad = [a for a in self.attack_params if a not in ROUND0]
        if bad:
            raise ConfigError(f"attack_params may name {list(ROUND0)}, got {bad}")
        for name, params in self.attack_params.items():  # a bad key fails now, not an hour into the run
            juap.ATTACKS.get(name).check_hyperparams(params)
        for name, params in self.interpreter_params.items():
            juap.INTERPRETERS.get(name)
            juap.ATTACKS.get("juap").check_hyperparams(params)


def load_evade_config(path: str | Path, overrides: Sequence[str] = ()) -> EvadeConfig:
    """Read an experiment file of ``juap evade`` (a path, or a shipped file's name), apply ``--set``
    overrides and validate every key (an unknown one is a ConfigError naming it)."""
    raw = apply_overrides(read_yaml_mapping(resolve_config(path), what="experiment file"), overrides)
    return from_dict(EvadeConfig, raw)


# -- the cells -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvadeCell:
    """One seed x budget x interpreter; ``rounds``: how many adaptive rounds it runs."""

    seed: int
    budget: BudgetConfig
    interpreter: str
    rounds: int
    headline: bool

    @property
    def id(self) -> str:
        return f"{self.interpreter}_{self.budget.norm}{self.budget.eps:g}_s{self.seed}"


def plan_cells(s: EvadeSettings) -> List[EvadeCell]:
    """Every cell, in run order: the headline budget first, so a short run answers first."""
    budgets = [s.headline] + [b for b in s.budgets if b != s.headline]
    return [
        EvadeCell(seed, b, interp, s.rounds if b == s.headline else min(1, s.rounds), b == s.headline)
        for seed in s.seeds
        for b in budgets
        for interp in s.interpreters
    ]


@dataclasses.dataclass
class Bench:
    """What every cell shares: the models and the images (attack train / val, detector train /
    calibration / test)."""

    cfg: EvadeConfig
    classifier: Any
    interpreters: Dict[str, Any]
    attack_train: torch.Tensor
    attack_val: Optional[torch.Tensor]
    det_train: torch.Tensor
    calibration: torch.Tensor
    test: torch.Tensor
    progress: bool = False
    say: Callable[[str], None] = lambda s: None


def min_calibration_images(fpr: float) -> int:
    """The clean calibration images a threshold at ``fpr`` needs (one false positive allowed)."""
    return math.ceil(1 / fpr - 1e-9)


def build_bench(cfg: EvadeConfig, run_dir: Path, *, cache_dir=None, progress=True, say=print) -> Bench:
    """Load the models and the data, divide the images and save the division (``split.json``)."""
    device = resolve_device(cfg.device)
    weights, ckpts = cfg.classifier.weights, dict(cfg.checkpoints)
    if weights == DEMO or DEMO in ckpts.values():
        demo_clf, demo_rts = demo_models(cache_dir=cache_dir, learned="rts", progress=progress)
        weights = demo_clf if weights == DEMO else weights
        ckpts = {n: demo_rts if p == DEMO else p for n, p in ckpts.items()}
    splits = load_splits(cfg.data, progress=progress)
    clf = build_classifier(
        dataclasses.replace(cfg.classifier, weights=weights), num_classes=splits.num_classes
    )
    clf = clf.to(device).eval()
    check_classes(clf, splits)
    interps = {
        n: build_interpreter(n, clf, checkpoint=ckpts.get(n)).to(device) for n in cfg.evade.interpreters
    }
    x_attack = to_tensors(splits.train)[0]
    x_det, _, skipped = to_tensors(splits.test)
    s = cfg.evade.split
    groups = data_set(cfg.data.name).groups([splits.test.path(i) for i in range(len(splits.test))])
    if groups is not None and not skipped:  # the crops of one photo in one part only
        parts = tuple(
            torch.tensor(p, dtype=torch.long)
            for p in split_groups(groups, fractions=(s.train, s.calibration), seed=cfg.seed)
        )
    else:
        order = torch.randperm(len(x_det), generator=torch.Generator().manual_seed(cfg.seed))
        n_train, n_cal = int(round(s.train * len(x_det))), int(round(s.calibration * len(x_det)))
        parts = order[:n_train], order[n_train : n_train + n_cal], order[n_train + n_cal :]
    need = min_calibration_images(cfg.evade.fpr)
    if len(parts[1]) < need:
        raise ConfigError(
            f"a threshold at {cfg.evade.fpr:.1%} FPR needs at least {need} clean calibration images; the "
            f"calibration split has {len(parts[1])} ({s.calibration:.0%} of the {len(x_det)} test images): "
            "raise data.num_images / data.test_fraction or evade.split.calibration, or raise evade.fpr"
        )
    if min(len(p) for p in parts) < 2:
        raise ConfigError(f"too few detector images ({len(x_det)}) to train, calibrate and test: add images")
    n_val = int(round(cfg.val_fraction * len(x_attack)))
    a_order = torch.randperm(len(x_attack), generator=torch.Generator().manual_seed(cfg.seed + 1))
    split = {
        "attack_train": a_order[n_val:].sort().values.tolist(),
        "attack_val": a_order[:n_val].sort().values.tolist(),
        **{
            k: p.sort().values.tolist()
            for k, p in zip(("detector_train", "calibration", "test"), parts, strict=True)
        },
        "grouped": groups is not None and not skipped,  # by source (photo), not by image
        "data": splits.split,
    }
    save_split(run_dir / "split.json", split)
    pick = lambda x, k: x[torch.tensor(split[k], dtype=torch.long)]  # noqa: E731
    return Bench(
        cfg,
        clf,
        interps,
        pick(x_attack, "attack_train"),
        pick(x_attack, "attack_val") if n_val else None,
        pick(x_det, "detector_train"),
        pick(x_det, "calibration"),
        pick(x_det, "test"),
        progress,
        say,
    )


# -- one cell ------------------------------------------------------------------------------------------
class CellRun:
    """One cell's arms race, every artifact saved as it is made and reused on a rerun."""

    def __init__(self, bench: Bench, cell: EvadeCell, folder: Path) -> None:
        self.b, self.cell, self.folder = bench, cell, folder
        self.s = bench.cfg.evade
        self.interp = bench.interpreters[cell.interpreter]
        self.perturbations: Dict[str, torch.Tensor] = {}  # name -> n_hat (3, H, W), in the order made
        self.meta: Dict[str, Dict[str, Any]] = {}  # name -> attack, round, against
        self.detectors: Dict[Tuple[str, int], Any] = {}  # (kind, round) -> detector
        self._fooled: Dict[str, torch.Tensor] = {}  # name -> detector-training images it fools
        self._train_pred: Optional[torch.Tensor] = None
        self._generators: Dict[str, torch.nn.Module] = {}  # round 0's label -> its trained generator

    # -- perturbations -------------------------------------------------------------------------------
    def attack_params(self, name: str) -> Dict[str, Any]:
        params = dict(self.b.cfg.attack_params.get(name, {}))
        if name == "juap":
            params.update(self.b.cfg.interpreter_params.get(self.cell.interpreter, {}))
        return params

    def perturbation(
        self, label: str, attack: str, *, round_: int = 0, against: str = "-", **extra
    ) -> torch.Tensor:
        """The perturbation ``label``: loaded from the cell folder, or learned and saved there. One that no
        interpreter or detector shapes (UAP, SGD-UAP, GUAP of round 0) is kept once for every interpreter
        of its seed and budget, in ``shared/``."""
        path = self.folder / "perturbations" / f"{label}.safetensors"
        if attack != "juap" and against == "-" and not path.is_file():
            path = self._shared(path.name)
        keep_generator = self.s.warm_start and attack in ADAPTIVE and against == "-"  # warm starts' origin
        gen_path = path.with_name(f"{label}.generator.safetensors")
        if path.is_file() and (not keep_generator or gen_path.is_file()):
            n_hat = load_tensors(path)[0]["perturbation"]
        else:
            params = {**self.attack_params(attack), **extra}
            params.setdefault("seed", self.cell.seed)
            interp = {"interpreter": self.interp} if attack == "juap" else {}
            a = juap.create_attack(
                attack, classifier=self.b.classifier, norm=self.cell.budget.norm, eps=self.cell.budget.eps,
                **interp, **params,
            )  # fmt: skip
            t0 = time.perf_counter()
            torch.manual_seed(_artifact_seed(label, self.cell.seed))  # each artifact from its own seed
            n_hat = a.fit(self.b.attack_train, val_data=self.b.attack_val, progress=self.b.progress).cpu()
            meta = {"attack": attack, "label": label, "round": round_, "against": against,
                    "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            if keep_generator:  # first, so that a perturbation on disk always has its generator
                tensors, g_meta = a.generator_artifact()
                save_tensors(gen_path, tensors, g_meta)
                self._generators[label] = a.generator.cpu()
            save_tensors(path, {"perturbation": n_hat}, meta)
            self.b.say(f"        {label:28s} learned in {meta['seconds']:.0f} s")
        self.perturbations[label] = n_hat
        self.meta[label] = {"attack": attack, "round": round_, "against": against}
        return n_hat

    def round0(self) -> None:
        for attack in ROUND0:
            self.perturbation(ROUND0_LABELS[attack], attack)

    def generator(self, label: str) -> torch.nn.Module:
        """Round 0's trained generator of ``label`` (R-JUAP, GUAP): where an adaptive attack starts."""
        if label not in self._generators:
            path = self.folder / "perturbations" / f"{label}.generator.safetensors"
            self._generators[label] = load_generator(path if path.is_file() else self._shared(path.name))[0]
        return self._generators[label]

    def _shared(self, name: str) -> Path:
        """File ``name`` of the folder that every interpreter of this seed and budget shares."""
        b = self.cell.budget
        return self.folder.parent.parent / "shared" / f"{b.norm}{b.eps:g}_s{self.cell.seed}" / name

    # -- detectors -----------------------------------------------------------------------------------
    def detector(self, kind: str, round_: int, pool: Sequence[str]):
        """Detector ``kind`` of round ``round_``, trained on the images the perturbations of ``pool`` fool
        (all of them if none is fooled) against the clean ones, calibrated at ``fpr``; saved and reused."""
        path = self.folder / "detectors" / f"{kind}_r{round_}.safetensors"
        interp = self.interp if juap.DETECTORS.get(kind).needs_interpreter else None
        if path.is_file():
            det = juap.load_detector(
                path, self.b.classifier, interp, image_size=tuple(self.b.test.shape[-2:])
            )
        else:
            x = self.b.det_train
            adv = [self._fooled_training_images(name) for name in pool]
            det = juap.create_detector(
                kind, classifier=self.b.classifier, interpreter=interp, **self.s.detector_params.get(kind, {})
            )
            torch.manual_seed(_artifact_seed(f"{kind}-r{round_}", self.cell.seed))
            det.fit(x, torch.cat(adv), seed=self.cell.seed + round_, batch_size=self.s.batch_size)
            det.calibrate(self.b.calibration, fpr=self.s.fpr)
            det.save(path)
        self.detectors[(kind, round_)] = det
        return det

    def _fooled_training_images(self, name: str) -> torch.Tensor:
        """The detector-training images that perturbation ``name`` fools (all of them if it fools none),
        computed once per perturbation however many detectors are trained on it."""
        if name not in self._fooled:
            x = self.b.det_train
            if self._train_pred is None:
                self._train_pred = _predict(self.b.classifier, x)
            x_hat = apply_perturbation(x, self.perturbations[name])
            fooled = is_fooled(self._train_pred, _predict(self.b.classifier, x_hat))
            self._fooled[name] = x_hat[fooled] if fooled.any() else x_hat
        return self._fooled[name]

    # -- the arms race -------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        s, cell = self.s, self.cell
        self.round0()
        pool = list(self.perturbations)
        for kind in s.detectors:
            self.detector(kind, 0, pool)
        for kind in s.detectors:
            kind_pool = list(pool)
            for r in range(1, cell.rounds + 1):
                previous = self.detectors[(kind, r - 1)]
                for attack in s.adaptive_attacks:
                    label = f"{_short(attack)}@{kind}-r{r}"
                    self.perturbation(label, attack, **self.adaptive(previous, f"{kind}-r{r - 1}", r, attack))
                    kind_pool.append(label)
                self.detector(kind, r, kind_pool)
        if cell.headline:
            self.sanity_perturbations()
        rows, curves = self.measure()
        return {"cell": dataclasses.asdict(cell), "id": cell.id, "rows": rows, "curves": curves}

    def sanity_perturbations(self) -> None:
        """At the headline budget: JUAP against round 0's detector with doubled and halved steps and another
        seed (its data order, and its input noise: after a warm start, the trained generator maps a new
        input), and a noise control of the same norm (random signs at L_inf, a scaled Gaussian at L2)."""
        for kind in self.s.sanity:
            det, against = self.detectors[(kind, 0)], f"{kind}-r0"
            steps = self._steps("juap")
            for suffix, k in (("2x-steps", 2 * steps), ("half-steps", max(1, steps // 2))):
                self.perturbation(
                    f"JUAP@{kind}-r1-{suffix}", "juap", **self.adaptive(det, against, 1, "juap", k)
                )
            restart = {**self.adaptive(det, against, 1, "juap"), "seed": self.cell.seed + 1000}
            self.perturbation(f"JUAP@{kind}-r1-restart", "juap", **restart)
        self.perturbations["noise"] = noise_control(
            self.b.test.shape[1:], self.cell.budget, seed=self.cell.seed
        )
        self.meta["noise"] = {"attack": "noise", "round": 0, "against": "-"}

    def _steps(self, attack: str) -> int:
        """The steps of an adaptive ``attack``: ``evade.adaptive_steps``, else the attack's own."""
        if self.s.adaptive_steps is not None:
            return self.s.adaptive_steps
        default = juap.ATTACKS.get(attack).hyperparams["steps"].default
        return int(self.attack_params(attack).get("steps", default))

    def adaptive(self, detector, against: str, round_: int, attack: str, steps: Optional[int] = None) -> Dict:
        """The keyword arguments of :meth:`perturbation` for an attack against ``detector``: the detector
        term (``mu``, its temperature, the ramp), a warm-up of ``warmup_fraction`` of the steps without
        it, a validation every ``adaptive_eval_every`` steps (each keeps the best evasion rate) and, with
        ``warm_start``, round 0's trained generator of the attack to start from."""
        s, steps = self.s, steps or self._steps(attack)
        warm = {"generator": self.generator(ROUND0_LABELS[attack])} if s.warm_start else {}
        return dict(
            round_=round_, against=against, detector=detector, mu=s.mu, detector_temperature=s.temperature,
            mu_schedule=s.mu_schedule, detector_warmup=int(s.warmup_fraction * steps), steps=steps,
            eval_every=min(s.adaptive_eval_every, steps), **warm,
        )  # fmt: skip

    # -- measuring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """Every detector of the cell against every perturbation of the cell, on the test images.

        Returns:
            (rows, curves): one row per detector x perturbation; the ROC points ``[fpr, tpr]`` of each
            round-0 detector against R-JUAP and against the round-1 adaptive perturbations, keyed
            ``"detector|perturbation"``.
        """
        x, clf, s = self.b.test, self.b.classifier, self.s
        pred = _predict(clf, x)
        views = {}
        for name, n_hat in self.perturbations.items():
            x_hat = apply_perturbation(x, n_hat)
            views[name] = (x_hat, is_fooled(pred, _predict(clf, x_hat)))
        rows, curves = [], {}
        for (kind, r), det in self.detectors.items():
            clean = _scores(det, x, s.batch_size)
            thr = float(det.threshold)
            for name, (x_hat, fooled) in views.items():
                adv = _scores(det, x_hat, s.batch_size)
                pos = adv[fooled]
                m = self.meta[name]
                if r == 0 and len(pos) and (name == "R-JUAP" or name.endswith(f"@{kind}-r1")):
                    curves[f"{kind}|{name}"] = [v.tolist() for v in roc_curve(clean, pos)]
                rows.append({
                    "seed": self.cell.seed, "norm": self.cell.budget.norm, "eps": self.cell.budget.eps,
                    "interpreter": self.cell.interpreter, "detector": kind, "detector_round": r,
                    "perturbation": name, "attack": m["attack"], "attack_round": m["round"],
                    "against": m["against"], "adaptive": m["against"] != "-",
                    "auroc": auroc(clean, pos) if len(pos) else None,
                    "tpr_1": tpr_at_fpr(clean, pos, 0.01) if len(pos) else None,
                    "tpr_fpr": tpr_at_fpr(clean, pos, s.fpr) if len(pos) else None,
                    "threshold": thr, "fpr": s.fpr, "test_fpr": float((clean > thr).double().mean()),
                    "fooling_ratio": float(fooled.double().mean()),
                    "evasion_rate": evasion_rate(fooled, adv, thr), "n_test": len(x),
                })  # fmt: skip
        return rows, curves


def _artifact_seed(label: str, seed: int) -> int:
    """The global seed set before making one artifact: a resumed cell makes the rest as a straight run."""
    return zlib.crc32(f"{label}:{seed}".encode())


def _short(attack: str) -> str:
    return {"juap": "JUAP", "guap": "GUAP"}[attack]


def _predict(clf, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = next(clf.parameters()).device
    with torch.no_grad():
        return torch.cat(
            [clf(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        )


def _scores(det, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(det.classifier.parameters()).device
    return torch.cat(
        [det.score(x[i : i + batch_size].to(device)).detach().cpu() for i in range(0, len(x), batch_size)]
    )


def noise_control(shape, budget: BudgetConfig, *, seed: int) -> torch.Tensor:
    """A perturbation without structure at the budget: random signs times eps at L_inf, a Gaussian scaled
    to eps at L2 (both in 0-255 units, returned in [0, 1] units like every perturbation)."""
    g = torch.Generator().manual_seed(seed + 77)
    if budget.norm == "linf":
        return (torch.randint(0, 2, tuple(shape), generator=g).float() * 2 - 1) * budget.eps / 255
    z = torch.randn(tuple(shape), generator=g)
    return z / z.norm() * budget.eps / 255


# -- the command ---------------------------------------------------------------------------------------
def run_evade(
    cfg: EvadeConfig,
    run_dir: Path,
    *,
    shard: Tuple[int, int] = (1, 1),
    cache_dir=None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Run every cell of ``cfg`` not finished yet (in this shard) into ``run_dir/cells/``, then write the
    report from all finished cells. Returns ``{"cells", "complete", "ran", "rows", "seconds"}``."""
    t0 = time.perf_counter()
    cells = plan_cells(cfg.evade)
    bench = build_bench(cfg, run_dir, cache_dir=cache_dir, progress=progress, say=say)
    ran = 0
    for k, cell in enumerate(cells):
        folder = run_dir / "cells" / cell.id
        if (folder / "rows.json").is_file() or k % shard[1] != shard[0] - 1:
            continue
        say(f"  [{k + 1}/{len(cells)}] {cell.id}: {'rounds 0-' + str(cell.rounds)} ...")
        t1 = time.perf_counter()
        result = CellRun(bench, cell, folder).run()
        write_json(folder / "rows.json", {**result, "seconds": round(time.perf_counter() - t1, 1)})
        ran += 1
    rows, done = write_report(cfg, run_dir, cells)
    return {
        "cells": len(cells),
        "complete": done,
        "ran": ran,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write_report(cfg: EvadeConfig, run_dir: Path, cells: Optional[Sequence[EvadeCell]] = None):
    """The report from every finished cell of ``run_dir`` (a partial one while cells are left).

    Returns:
        (rows, number of finished cells).
    """
    cells = plan_cells(cfg.evade) if cells is None else cells
    rows, curves, done = [], {}, 0
    for cell in cells:
        path = run_dir / "cells" / cell.id / "rows.json"
        if path.is_file():
            result = json.loads(path.read_text())
            rows += result["rows"]
            curves[cell.id] = result["curves"]
            done += 1
    write_evasion_report(run_dir, rows, curves, cfg.evade, complete=done == len(cells))
    return rows, done
