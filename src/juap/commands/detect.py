"""`juap detect`: can an interpretation-based inspector or detector tell adversarial images apart?"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from .._validate import check_range
from ..app.artifacts import check_made_for, load_perturbation, read_perturbation_metadata
from ..app.report import map_panels, markdown_table, roc_grid, write_csv
from ..app.runs import finish_run
from ..budget import apply_perturbation
from ..data import load_splits, save_split, to_tensors
from ..detection import (
    FEATURE_SETS,
    INSPECTORS,
    LogisticDetector,
    explain_all,
    inspector_scores,
    map_features,
    shuffled_controls,
    split_images,
)
from ..errors import ConfigError
from ..metrics import auroc, is_fooled, roc_curve, tpr_at_fpr
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import write_text
from .build import build_classifier, build_interpreter, check_classes, learned_checkpoints
from .configs import ClassifierConfig, DataConfig, EvalConfig, attack_split_data


# -- configuration -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    """How detection is measured (``detect`` section of ``juap detect``'s config).

    ``train_fraction`` of the images (split by image, seeded) trains the deployable detector, the rest
    evaluates everything; ``only_fooled`` counts as adversarial only the images whose prediction the
    perturbation changed (the ones an inspector has to catch); ``control`` is the reference inspector's
    benign control (``shuffle``: the perturbation's values permuted per image, same L2 and L_inf norms;
    ``none``: the benign map compared with itself, which scores 0).
    """

    train_fraction: float = 0.5
    only_fooled: bool = True
    fpr: float = 0.05
    weight_decay: float = 1e-2
    control: Literal["shuffle", "none"] = "shuffle"
    batch_size: int = 64
    figure_images: int = 2

    def __post_init__(self) -> None:
        check_range("detect.train_fraction", self.train_fraction, low=0, high=1, low_open=True)
        if self.train_fraction >= 1:
            raise ConfigError("detect.train_fraction must be below 1: held-out images are needed")
        check_range("detect.fpr", self.fpr, low=0, high=1, low_open=True)
        check_range("detect.weight_decay", self.weight_decay, low=0)
        check_range("detect.batch_size", self.batch_size, low=1)
        check_range("detect.figure_images", self.figure_images, low=0)


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    """``juap detect``: the data (its test split is used), classifier, interpreters and the settings."""

    data: DataConfig = dataclasses.field(default_factory=attack_split_data)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    detect: DetectorSettings = dataclasses.field(default_factory=DetectorSettings)
    seed: int = 0
    device: str = "auto"


def _roc_entry(neg: torch.Tensor, pos: torch.Tensor, fpr: float) -> Dict[str, Any]:
    if len(neg) == 0 or len(pos) == 0:
        return {"auroc": None, "tpr_at_fpr": None, "roc": None}
    f, t = roc_curve(neg, pos)
    return {"auroc": auroc(neg, pos), "tpr_at_fpr": tpr_at_fpr(neg, pos, fpr), "roc": (f, t)}


def detect_interpreter(
    interpreter,
    x: torch.Tensor,
    perturbations: Mapping[str, torch.Tensor],
    *,
    settings: DetectorSettings = DetectorSettings(),
    seed: int = 0,
    interpreter_name: str = "",
) -> Dict[str, Any]:
    """Every detector against every perturbation under one interpreter.

    Args:
        interpreter: the (unmodified) interpreter whose maps the inspectors see.
        x: benign images (N, 3, H, W) in [0, 1], none of them used to fit the perturbations.
        perturbations: ``{name: n_hat (3, H, W)}``; cross-attack detectors for one name are trained on
            the others (leave one perturbation out), so a single perturbation gets no cross-attack row.
        settings: the split, the FPR for the TPR, the detector's penalty, the inspector's control.

    Returns:
        ``{"rows": [...], "curves": {(attack, detector): (fpr, tpr)}, "train_images": (T,),
        "test_images": (E,)}``; a row has interpreter, attack, detector, setting, trained_on, auroc,
        tpr_at_fpr, fooling_ratio and the counts of benign / adversarial test examples.
    """
    if not perturbations:
        raise ConfigError("give at least one perturbation to detect")
    n = len(x)
    train_idx, test_idx = split_images(n, settings.train_fraction, seed=seed)
    is_train = torch.zeros(n, dtype=torch.bool)
    is_train[train_idx] = True
    b_logits, b_maps = explain_all(interpreter, x, batch_size=settings.batch_size)
    b_pred = b_logits.argmax(1)
    feats_benign = _features(b_maps, b_logits)
    adv = {
        name: _adversarial_view(interpreter, x, n_hat, b_maps, b_pred, settings, seed=seed + 1000 + k)
        for k, (name, n_hat) in enumerate(perturbations.items())
    }
    rows: List[Dict[str, Any]] = []
    curves: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}
    test = ~is_train

    def add(name: str, detector: str, setting: str, trained_on: str, neg, pos) -> None:
        e = _roc_entry(neg, pos, settings.fpr)
        if e["roc"] is not None and setting != "noise-control":
            curves[(name, detector)] = e["roc"]
        rows.append(
            {
                "interpreter": interpreter_name,
                "attack": name,
                "detector": detector,
                "setting": setting,
                "trained_on": trained_on,
                "auroc": e["auroc"],
                "tpr_at_fpr": e["tpr_at_fpr"],
                "fpr": settings.fpr,
                "fooling_ratio": adv[name]["fooling_ratio"],
                "n_benign": int(len(neg)),
                "n_adversarial": int(len(pos)),
            }
        )

    for name, a in adv.items():
        pos_test = a["keep"] & test
        for det in INSPECTORS:
            add(name, det, "reference", "-", a["inspect_ctrl"][det][test], a["inspect_adv"][det][pos_test])
        for fs in FEATURE_SETS:
            _train_detectors(fs, name, adv, feats_benign[fs], is_train, settings, add)
    return {"rows": rows, "curves": curves, "train_images": train_idx, "test_images": test_idx}


def _train_detectors(fs: str, name: str, adv, benign: torch.Tensor, is_train, settings, add) -> None:
    """The deployable detector on feature set ``fs`` against perturbation ``name``: trained on its own
    adversarial images (in-distribution) and on the others' (cross-attack), scored on held-out images."""
    a, test = adv[name], ~is_train
    neg_test, pos_test = benign[test], a["keep"] & test
    plans = [("in-distribution", [name])]
    others = [o for o in adv if o != name]
    if others:
        plans.append(("cross-attack", others))
    for setting, sources in plans:
        pos_train = [adv[s]["feats"][fs][adv[s]["keep"] & is_train] for s in sources]
        feats_tr = torch.cat([benign[is_train], *pos_train])
        labels = torch.cat([torch.zeros(int(is_train.sum())), torch.ones(sum(len(p) for p in pos_train))])
        det = f"detector ({fs})" + (" cross" if setting == "cross-attack" else "")
        if sum(len(p) for p in pos_train) == 0:
            add(name, det, setting, "+".join(sources), neg_test, neg_test[:0])
            continue
        model = LogisticDetector(weight_decay=settings.weight_decay).fit(feats_tr, labels)
        add(
            name,
            det,
            setting,
            "+".join(sources),
            model.score(neg_test),
            model.score(a["feats"][fs][pos_test]),
        )
        if setting == "in-distribution" and a["control_feats"] is not None:
            # Does the detector flag any perturbation of this size, structure or not? Clean vs the
            # same held-out images under the shuffled perturbation (0.5: it ignores such noise).
            ctrl = model.score(a["control_feats"][fs][test])
            add(name, f"detector ({fs}) noise", "noise-control", name, model.score(neg_test), ctrl)


def _features(maps: torch.Tensor, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The deployable detector's features of each feature set (maps alone, maps and confidence)."""
    return {fs: map_features(maps, logits if fs == "map+conf" else None) for fs in FEATURE_SETS}


def _adversarial_view(interpreter, x, n_hat, b_maps, b_pred, settings: DetectorSettings, *, seed: int):
    """What the detectors see of one perturbation: which images count, the inspectors' scores on it and
    on its control, and the detector features of both."""
    a_logits, a_maps = explain_all(interpreter, x, n_hat, batch_size=settings.batch_size)
    fooled = is_fooled(b_pred, a_logits.argmax(1))
    c_maps, c_feats = b_maps, None
    if settings.control == "shuffle":  # the same values, their structure destroyed
        controls = shuffled_controls(n_hat, len(x), seed=seed)
        c_logits, c_maps = explain_all(interpreter, x, controls, batch_size=settings.batch_size)
        c_feats = _features(c_maps, c_logits)
    return {
        "keep": fooled if settings.only_fooled else torch.ones(len(x), dtype=torch.bool),
        "fooling_ratio": float(fooled.float().mean()),
        "inspect_adv": inspector_scores(b_maps, a_maps),
        "inspect_ctrl": inspector_scores(b_maps, c_maps),
        "control_feats": c_feats,
        "feats": _features(a_maps, a_logits),
    }


# -- tables ------------------------------------------------------------------------------------------
DETECTOR_COLUMNS = (
    "inspector L1",
    "inspector 1-IoU",
    "detector (map)",
    "detector (map) cross",
    "detector (map+conf)",
    "detector (map+conf) cross",
)


NOISE_COLUMNS = ("detector (map) noise", "detector (map+conf) noise")


def detection_markdown(rows: Sequence[Mapping[str, Any]], *, fpr: float = 0.05) -> str:
    """Two Markdown tables (AUROC; TPR at ``fpr`` false positives), one row per interpreter x attack."""
    keys: List[Tuple[str, str]] = []
    for r in rows:
        if (r["interpreter"], r["attack"]) not in keys:
            keys.append((r["interpreter"], r["attack"]))

    def value(interp: str, attack: str, det: str, field: str):
        for r in rows:
            if r["interpreter"] == interp and r["attack"] == attack and r["detector"] == det:
                return r[field]
        return None

    def n_adv(interp: str, attack: str):
        return value(interp, attack, "inspector L1", "n_adversarial")

    header = ["interpreter", "attack", "FR", "n adv"] + list(DETECTOR_COLUMNS)
    out = []
    for field, title in (("auroc", "AUROC"), ("tpr_at_fpr", f"TPR at {fpr:.0%} FPR")):
        table = [
            [i, a, value(i, a, "inspector L1", "fooling_ratio"), n_adv(i, a)]
            + [value(i, a, d, field) for d in DETECTOR_COLUMNS]
            for i, a in keys
        ]
        out.append(f"**{title}**\n\n" + markdown_table(header, table))
    noise = [d for d in NOISE_COLUMNS if any(r["detector"] == d for r in rows)]
    if noise:
        table = [[i, a] + [value(i, a, d, "auroc") for d in noise] for i, a in keys]
        out.append(
            "**Noise check** (AUROC of each in-distribution detector between clean held-out images and the "
            "same images under the perturbation's values shuffled: same norms, no structure; near 0.5 = the "
            "detector reacts to the perturbation's structure, near 1 = it flags any perturbation of this "
            "size)\n\n" + markdown_table(["interpreter", "attack"] + noise, table)
        )
    return "\n\n".join(out)


def roc_panels(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Dict[str, Tuple]]]:
    """``{interpreter: {detector: {attack: (fpr, tpr)}}}`` from :func:`detect_interpreter` results."""
    panels: Dict[str, Dict[str, Dict[str, Tuple]]] = {}
    for interp, res in results.items():
        for (attack, det), curve in res["curves"].items():
            panels.setdefault(interp, {}).setdefault(det, {})[attack] = curve
    return panels


def _auc_lookup(rows: Sequence[Mapping[str, Any]]) -> Dict[Tuple[str, str, str], float]:
    return {
        (r["interpreter"], r["detector"], r["attack"]): r["auroc"] for r in rows if r["auroc"] is not None
    }


def write_detection_outputs(
    run_dir: Path, results: Mapping[str, Mapping[str, Any]], *, fpr: float, prefix: str = ""
) -> Tuple[List[Dict[str, Any]], str]:
    """Write ``detection.csv``, ``detection.md`` and ``roc.png``; return (rows, markdown tables)."""
    rows = [r for res in results.values() for r in res["rows"]]
    write_csv(
        run_dir / f"{prefix}detection.csv",
        rows,
        columns=(
            "interpreter",
            "attack",
            "detector",
            "setting",
            "trained_on",
            "auroc",
            "tpr_at_fpr",
            "fpr",
            "fooling_ratio",
            "n_benign",
            "n_adversarial",
        ),
    )
    md = detection_markdown(rows, fpr=fpr)
    write_text(run_dir / f"{prefix}detection.md", "# Detection\n\n" + DETECTION_NOTE + "\n\n" + md + "\n")
    roc_grid(run_dir / f"{prefix}roc.png", roc_panels(results), aurocs=_auc_lookup(rows))
    return rows, md


DETECTION_NOTE = (
    "Higher AUROC / TPR = easier to detect; 0.5 = the detector cannot tell adversarial from benign. "
    "*Inspector* columns: the reference inspector of Fig. 1, which sees both I(x) and I(x_hat) and scores "
    "their L1 or 1 - mean top-k IoU; its benign inputs are the same images under the perturbation's values "
    "shuffled (same norms, no structure). *Detector* columns: a logistic regression that sees only the "
    "input's own map statistics (`map`) or those plus the classifier's confidence (`map+conf`), trained on "
    "one half of the images and evaluated on the other half; `cross` = trained on the other perturbations "
    "of the row's interpreter only (never on the one it is tested against). Adversarial examples are the "
    "held-out images whose prediction the perturbation changed (n adv); benign ones are all held-out "
    "clean images. **Non-adaptive**: no attack here knew the detector, so these figures are an upper bound "
    "on what the detectors catch (Carlini et al. 2019); `juap evade` trains the attack against each "
    "detector and reports the evasion rate beside these figures."
)


# -- the Fig. 1-style figure -------------------------------------------------------------------------
@torch.no_grad()
def fig1_rows(
    interpreters: Mapping[str, Any],
    x: torch.Tensor,
    perturbations: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    class_names: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Rows for :func:`~juap.app.report.map_panels`: per image and interpreter, the benign map then the
    map of each perturbation (``perturbations[interpreter][label]``), each on its own input, captioned
    with the predicted class.
    """
    name = (lambda c: class_names[c]) if class_names else str
    rows = []
    for j in range(len(x)):
        xi = x[j : j + 1]
        for iname, interp in interpreters.items():
            device = next(interp.classifier.parameters()).device
            lg, mp = interp.explain(xi.to(device))
            panels = [(xi[0], mp[0].cpu(), f"benign: {name(int(lg.argmax(1)))}")]
            for label, n_hat in perturbations[iname].items():
                xa = apply_perturbation(xi, n_hat)
                lga, mpa = interp.explain(xa.to(device))
                panels.append((xa[0], mpa[0].cpu(), f"{label}: {name(int(lga.argmax(1)))}"))
            rows.append({"label": f"image {j + 1} / {iname}", "panels": panels})
    return rows


# -- ``juap detect`` ---------------------------------------------------------------------------------
def parse_perturbation_specs(specs: Sequence[str]) -> List[Tuple[Optional[str], str]]:
    """``["NAME=PATH", "PATH", ...]`` -> ``[(name or None, path), ...]``."""
    out = []
    for s in specs:
        if "=" in s and not Path(s).exists():
            name, path = s.split("=", 1)
            if not name.strip():
                raise ConfigError(
                    f"--perturbation {s!r}: the name before '=' is empty (use NAME=FILE or FILE)"
                )
            out.append((name.strip(), path))
        else:
            out.append((None, s))
    return out


def load_named_perturbations(specs: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Load perturbation files; a name comes from ``NAME=FILE`` or the file's ``attack`` metadata."""
    if not specs:
        raise ConfigError("juap detect needs at least one --perturbation FILE (or NAME=FILE)")
    out: Dict[str, torch.Tensor] = {}
    for name, path in parse_perturbation_specs(specs):
        n_hat = load_perturbation(path)
        if name is None:
            meta = read_perturbation_metadata(path)
            name = str(meta.get("attack") or Path(path).stem).upper()
        base, k = name, 2
        while name in out:
            name = f"{base}-{k}"
            k += 1
        out[name] = n_hat
    return out


def run_detect(
    cfg: DetectConfig,
    perturbation_specs: Sequence[str],
    run_dir: Path,
    *,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """``juap detect``: every perturbation against every interpreter on the data's test split.

    Writes ``detection.csv``, ``detection.md``, ``roc.png``, ``fig1.png``, ``config.yaml`` and
    ``metrics.json`` into ``run_dir``; returns the metrics.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    perturbations = load_named_perturbations(perturbation_specs)
    size = cfg.data.image_size
    for name, n_hat in perturbations.items():
        if tuple(n_hat.shape[1:]) != (size, size):
            raise ConfigError(
                f"perturbation {name} is {n_hat.shape[1]}x{n_hat.shape[2]} but the data is resized to "
                f"{size}x{size}: set data.image_size={n_hat.shape[1]} or use one made for this size"
            )
    splits = load_splits(cfg.data, progress=progress)
    save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device).eval()
    check_classes(clf, splits)
    for _, path in parse_perturbation_specs(perturbation_specs):
        check_made_for(read_perturbation_metadata(path), clf, path)
    ckpts = learned_checkpoints(cfg.evaluate)
    names = list(dict.fromkeys([*cfg.evaluate.interpreters, *ckpts]))
    interps = {n: build_interpreter(n, clf, checkpoint=ckpts.get(n)).to(device) for n in names}
    if not interps:
        raise ConfigError("no interpreter to inspect with: set evaluate.interpreters (e.g. [cam, gradcam])")
    x, _, _ = to_tensors(splits.test)
    if cfg.evaluate.max_images and cfg.evaluate.max_images < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[
            : cfg.evaluate.max_images
        ]
        x = x[keep.sort().values]
    results = {}
    for iname, interp in interps.items():
        say(f"  {iname}: maps of {len(x)} benign images and {len(perturbations)} perturbation(s) ...")
        results[iname] = detect_interpreter(
            interp, x, perturbations, settings=cfg.detect, seed=cfg.seed, interpreter_name=iname
        )
    rows, md = write_detection_outputs(run_dir, results, fpr=cfg.detect.fpr)
    if cfg.detect.figure_images:
        test_idx = next(iter(results.values()))["test_images"]
        xs = x[test_idx[: cfg.detect.figure_images]]
        map_panels(
            run_dir / "fig1.png",
            fig1_rows(interps, xs, {i: dict(perturbations) for i in interps}, class_names=splits.classes),
            title="benign vs adversarial maps under each interpreter (Fig. 1 style)",
        )
    first = next(iter(results.values()))
    metrics = {
        "perturbations": list(perturbations),
        "perturbation_files": list(perturbation_specs),
        "interpreters": list(interps),
        "n_images": len(x),
        "train_images": len(first["train_images"]),
        "test_images": len(first["test_images"]),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    metrics["markdown"] = md
    return metrics


# -- the demo's Detection section --------------------------------------------------------------------
def demo_detection(
    run_dir: Path,
    interpreters: Mapping[str, Any],
    perturbations: Mapping[str, torch.Tensor],
    x_test: torch.Tensor,
    *,
    class_names: Optional[Sequence[str]] = None,
    seed: int = 0,
    settings: DetectorSettings = DetectorSettings(),
    say: Callable[[str], None] = lambda s: None,
) -> Dict[str, Any]:
    """The demo's Detection section: UAP, SGD-UAP, GUAP and R-JUAP (trained against each interpreter)
    under each interpreter, on the demo's held-out attack-test images.

    Appends the section to ``results.md`` and writes ``detection.csv``, ``detection.md``, ``roc.png`` and
    ``fig1.png``. Returns ``{"rows": [...], "seconds": ...}`` for ``metrics.json``.
    """
    t0 = time.perf_counter()
    per_interp: Dict[str, Dict[str, torch.Tensor]] = {}
    for iname in interpreters:
        chosen = {label: perturbations.get(label) for label in ("UAP", "SGD-UAP", "GUAP")}
        if f"R-JUAP-{iname}" in perturbations:
            chosen["JUAP"] = perturbations[f"R-JUAP-{iname}"]
        chosen = {k: v for k, v in chosen.items() if v is not None}
        if chosen:
            per_interp[iname] = chosen
    if not per_interp or len(x_test) < 2:
        say("      detection skipped: no perturbation or too few test images")
        return {"rows": [], "seconds": 0.0}
    results = {
        iname: detect_interpreter(
            interpreters[iname],
            x_test,
            per_interp[iname],
            settings=settings,
            seed=seed,
            interpreter_name=iname,
        )
        for iname in per_interp
    }
    rows, md = write_detection_outputs(run_dir, results, fpr=settings.fpr)
    test_idx = next(iter(results.values()))["test_images"]
    map_panels(
        run_dir / "fig1.png",
        fig1_rows(
            {i: interpreters[i] for i in per_interp},
            x_test[test_idx[: settings.figure_images]],
            per_interp,
            class_names=class_names,
        ),
        title="benign vs adversarial maps (Fig. 1 style; JUAP: R-JUAP trained against the row's interpreter)",
    )
    section = (
        "\n## Detection — can an inspector of the maps catch the perturbation?\n\n"
        f"JUAP = R-JUAP trained against the row's interpreter; {len(x_test)} held-out images, "
        f"{len(test_idx)} of them for evaluation. "
        + DETECTION_NOTE
        + "\n\n"
        + md
        + "\n\n![ROC curves](roc.png)\n\n![Fig. 1 style](fig1.png)\n"
    )
    results_md = run_dir / "results.md"
    previous = results_md.read_text() if results_md.exists() else ""
    write_text(results_md, previous + section)
    seconds = time.perf_counter() - t0
    say(f"      detection table for {', '.join(per_interp)} written ({seconds:.0f} s)")
    return {"rows": rows, "seconds": round(seconds, 1)}
