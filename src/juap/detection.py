"""Interpretation-based detection of universal perturbations (the paper's Fig. 1 finding), and evasion.

Two inspectors look at attribution maps and score how adversarial an input looks:

* the **reference inspector** of Fig. 1 sees both maps, ``I(x)`` and ``I(x_hat)``, and scores their
  discrepancy (L1, eq 19, or 1 - mean top-k IoU, eq 20). Its negatives are *benign controls*: the same
  image under a structure-less perturbation of exactly the same norms (the adversarial perturbation's
  values shuffled across pixels and channels, one permutation per image), so the score measures what
  the perturbation's *structure* does to the map, not that some noise was added (every perturbation
  moves a continuous map a little; comparing ``I(x)`` with itself would make any attack look
  perfectly detectable).
* the **deployable detector** sees only the map (and the prediction) of the input at hand: a logistic
  regression on statistics of that map (entropy, top-k mass, spread, centroid, smoothness, scale) and,
  in the ``map+conf`` variant, the classifier's confidence. It is trained on benign and adversarial
  images of one set of images and evaluated on disjoint held-out images (an image and its adversarial
  twin are never split across the two), against the perturbation it was trained on (in-distribution)
  and against one it never saw (cross-attack: trained on the other perturbations only). A *noise check*
  scores the in-distribution detector on the shuffled controls: near 0.5 means it reacts to the
  perturbation's structure, near 1 that it flags any perturbation of that size.

Scores are ranked with :func:`auroc` (the Mann-Whitney rank statistic, ties counted half) and
:func:`tpr_at_fpr`. :func:`detect_interpreter` produces the rows of one interpreter, :func:`run_detect`
is ``juap detect``, and :func:`demo_detection` adds the Detection section to the demo.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from .config import ClassifierConfig, DataConfig, EvalConfig, attack_split_data, check_range, to_dict
from .errors import ConfigError
from .interpreters.base import normalize_maps
from .metrics import IOU_KS, iou_topk, l1_distance

INSPECTORS = ("inspector L1", "inspector 1-IoU")
FEATURE_SETS = ("map", "map+conf")
MAP_FEATURES = (
    "entropy",
    "top10_mass",
    "top30_mass",
    "mean",
    "std",
    "spread",
    "center_distance",
    "total_variation",
    "log_scale",
)
CONF_FEATURES = ("max_prob", "logit_margin", "pred_entropy")


# -- ranking metrics ---------------------------------------------------------------------------------
def _check_scores(negatives: torch.Tensor, positives: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    neg = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    pos = torch.as_tensor(positives, dtype=torch.float64).flatten()
    if len(neg) == 0 or len(pos) == 0:
        raise ConfigError(
            f"a ROC needs at least one benign and one adversarial score, got {len(neg)} and {len(pos)} "
            "(an attack that fools no image leaves no adversarial examples to detect)"
        )
    if not (torch.isfinite(neg).all() and torch.isfinite(pos).all()):
        raise ConfigError("detection scores must be finite; got NaN or infinity")
    return neg, pos


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: P(score(adversarial) > score(benign)) + P(equal) / 2.

    Computed as the Mann-Whitney U statistic from average ranks (tied scores share their mean rank), so
    identical score distributions give exactly 0.5 and perfectly separated ones 1.0.

    Args:
        negatives: scores of benign inputs (M,).
        positives: scores of adversarial inputs (P,); higher means "more adversarial".

    Returns:
        AUROC in [0, 1].
    """
    neg, pos = _check_scores(negatives, positives)
    scores = torch.cat([neg, pos])
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last element of each tied group
    avg_rank = ends - (counts.double() - 1) / 2
    rank_pos = avg_rank[inverse[len(neg) :]].sum()
    u = rank_pos - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def roc_curve(negatives: torch.Tensor, positives: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ROC points for thresholds at every distinct score ("adversarial" when score >= threshold).

    Returns:
        ``(fpr, tpr)``, each (T + 1,) from (0, 0) to (1, 1), non-decreasing; tied scores form one step.
    """
    neg, pos = _check_scores(negatives, positives)
    thresholds = torch.unique(torch.cat([neg, pos])).flip(0)  # descending
    fpr = (neg[None, :] >= thresholds[:, None]).double().mean(1)
    tpr = (pos[None, :] >= thresholds[:, None]).double().mean(1)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr])


def tpr_at_fpr(negatives: torch.Tensor, positives: torch.Tensor, fpr: float = 0.05) -> float:
    """The largest true-positive rate of a threshold whose false-positive rate is at most ``fpr``.

    Thresholds sit at observed scores (tied scores are flagged together), so the rate is achievable by
    a real threshold on these scores, never interpolated.
    """
    check_range("fpr", fpr, low=0, high=1)
    f, t = roc_curve(negatives, positives)
    return float(t[f <= fpr + 1e-12].max())


# -- the reference inspector -------------------------------------------------------------------------
def inspector_scores(benign_maps: torch.Tensor, other_maps: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fig. 1's inspector: the discrepancy between the map of ``x`` and the map of the input at hand.

    Args:
        benign_maps: ``I(x)`` (N, h, w).
        other_maps: the maps of the inspected inputs (N, h, w), e.g. ``I(x_hat)``.

    Returns:
        ``{"inspector L1": (N,), "inspector 1-IoU": (N,)}``: eq 19's L1 and 1 - the mean top-k IoU of
        eq 20 (k in 10..50%), both higher for more different maps.
    """
    if benign_maps.shape != other_maps.shape:
        raise ConfigError(
            f"the two sets of maps must have the same shape, got {tuple(benign_maps.shape)} and "
            f"{tuple(other_maps.shape)}"
        )
    a, b = benign_maps.float(), other_maps.float()
    iou = torch.stack([iou_topk(a, b, k) for k in IOU_KS]).mean(0)
    return {"inspector L1": l1_distance(b, a), "inspector 1-IoU": 1 - iou}


# -- the deployable detector -------------------------------------------------------------------------
def map_features(maps: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Statistics of each input's own map (and, with ``logits``, of its prediction's confidence).

    Args:
        maps: raw maps (N, h, w) of the inputs' predicted classes.
        logits: the classifier's logits (N, C), or ``None`` for the map statistics alone.

    Returns:
        (N, F) features, in the order of :data:`MAP_FEATURES` (+ :data:`CONF_FEATURES` with logits).
    """
    if maps.dim() != 3:
        raise ConfigError(f"maps must have shape (N, h, w), got {tuple(maps.shape)}")
    maps = maps.detach().float()
    n, h, w = maps.shape
    m = normalize_maps(maps)  # (N, h, w) in [0, 1]
    flat = m.flatten(1)
    npix = flat.shape[1]
    total = flat.sum(1).clamp_min(1e-12)
    p = flat / total[:, None]  # the map as a distribution over pixels
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(max(npix, 2))
    desc = flat.sort(1, descending=True).values
    top = [desc[:, : max(1, round(npix * q))].sum(1) / total for q in (0.1, 0.3)]
    yy, xx = torch.meshgrid(
        (torch.arange(h, dtype=torch.float32) + 0.5) / h,
        (torch.arange(w, dtype=torch.float32) + 0.5) / w,
        indexing="ij",
    )
    yy, xx = yy.flatten().to(maps.device), xx.flatten().to(maps.device)
    cy, cx = (p * yy).sum(1), (p * xx).sum(1)
    spread = ((p * ((yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2)).sum(1)).clamp_min(0).sqrt()
    center = ((cy - 0.5) ** 2 + (cx - 0.5) ** 2).sqrt()
    tv = torch.zeros(n, device=maps.device)
    if w > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).mean(1)
    if h > 1:
        tv = tv + (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).mean(1)
    raw = maps.flatten(1)
    scale = torch.log1p((raw.amax(1) - raw.amin(1)).clamp_min(0))
    feats = [
        entropy,
        *top,
        flat.mean(1),
        flat.std(1) if npix > 1 else torch.zeros(n),
        spread,
        center,
        tv,
        scale,
    ]
    if logits is not None:
        logits = logits.detach().float()
        prob = logits.softmax(1)
        two = logits.topk(min(2, logits.shape[1]), dim=1).values
        margin = two[:, 0] - two[:, -1]
        ent = -(prob * prob.clamp_min(1e-12).log()).sum(1)
        feats += [prob.amax(1), margin, ent]
    return torch.stack(feats, 1)


class LogisticDetector:
    """Logistic regression on standardised features, fitted with L-BFGS (full batch, deterministic).

    The standardisation (mean, std) comes from the training features only; the two classes are weighted
    equally whatever their counts.

    Args:
        weight_decay: L2 penalty on the weights (not the bias).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, *, weight_decay: float = 1e-2, max_iter: int = 200) -> None:
        check_range("weight_decay", weight_decay, low=0)
        check_range("max_iter", max_iter, low=1)
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> LogisticDetector:
        """Fit on (N, F) features with labels (N,) in {0 (benign), 1 (adversarial)}."""
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(labels, dtype=torch.float64).flatten()
        if x.dim() != 2 or len(x) != len(y):
            raise ConfigError(
                f"features (N, F) and labels (N,) must match, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        n_pos, n_neg = float(y.sum()), float((1 - y).sum())
        if n_pos == 0 or n_neg == 0:
            raise ConfigError(
                "the detector needs benign and adversarial training examples, got one class only"
            )
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=torch.float64)
        z = (x - self.mean) / self.std
        sample_w = torch.where(y > 0.5, 0.5 / n_pos, 0.5 / n_neg)  # each class sums to 1/2
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logit = z @ w + b
            loss = (
                sample_w * torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
            ).sum()
            loss = loss + self.weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N,): higher means more likely adversarial."""
        if self.weight is None:
            raise ConfigError("the detector is not fitted yet: call fit(features, labels) first")
        z = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.std
        return z @ self.weight + self.bias


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


# -- collecting maps and scoring ---------------------------------------------------------------------
def split_images(n: int, train_fraction: float, *, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of image indices 0..n-1 into disjoint (train, test) sets, both sorted and non-empty."""
    if n < 2:
        raise ConfigError(f"detection needs at least 2 images (one to train, one to test), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = min(n - 1, max(1, int(round(train_fraction * n))))
    return order[:n_train].sort().values, order[n_train:].sort().values


def shuffled_controls(n_hat: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` copies of ``n_hat`` (3, H, W), each with its values permuted at random: same norms, no structure.

    Returns:
        (n, 3, H, W).
    """
    flat = n_hat.detach().flatten()
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(flat.numel(), generator=g) for _ in range(n)])
    return flat[perms].view(n, *n_hat.shape)


@torch.no_grad()
def explain_all(
    interpreter, x: torch.Tensor, perturbation: Optional[torch.Tensor] = None, *, batch_size: int = 64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and maps of the predicted classes for ``clamp(x + perturbation)`` (or ``x``), batched.

    Args:
        interpreter: a juap interpreter (``explain(x) -> (logits, maps)``).
        x: images (N, 3, H, W) in [0, 1].
        perturbation: ``None``, one perturbation (3, H, W) or one per image (N, 3, H, W).

    Returns:
        ``(logits (N, C), maps (N, h, w))`` on the CPU.
    """
    from .budget import apply_perturbation

    device = next(interpreter.classifier.parameters()).device
    logits, maps = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        if perturbation is not None:
            pb = perturbation if perturbation.dim() == 3 else perturbation[i : i + batch_size]
            xb = apply_perturbation(xb, pb.to(device))
        lg, mp = interpreter.explain(xb)
        logits.append(lg.detach().cpu())
        maps.append(mp.detach().float().cpu())
    return torch.cat(logits), torch.cat(maps)


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
    feats_benign = {fs: map_features(b_maps, b_logits if fs == "map+conf" else None) for fs in FEATURE_SETS}
    adv: Dict[str, Dict[str, Any]] = {}
    for k, (name, n_hat) in enumerate(perturbations.items()):
        a_logits, a_maps = explain_all(interpreter, x, n_hat, batch_size=settings.batch_size)
        fooled = a_logits.argmax(1) != b_pred
        keep = fooled if settings.only_fooled else torch.ones(n, dtype=torch.bool)
        c_feats = None
        if settings.control == "shuffle":
            controls = shuffled_controls(n_hat, n, seed=seed + 1000 + k)
            c_logits, c_maps = explain_all(interpreter, x, controls, batch_size=settings.batch_size)
            c_feats = {
                fs: map_features(c_maps, c_logits if fs == "map+conf" else None) for fs in FEATURE_SETS
            }
        else:
            c_maps = b_maps
        adv[name] = {
            "keep": keep,
            "fooling_ratio": float(fooled.float().mean()),
            "inspect_adv": inspector_scores(b_maps, a_maps),
            "inspect_ctrl": inspector_scores(b_maps, c_maps),
            "control_feats": c_feats,
            "feats": {
                fs: map_features(a_maps, a_logits if fs == "map+conf" else None) for fs in FEATURE_SETS
            },
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
            neg_test = feats_benign[fs][test]
            plans = [("in-distribution", [name])]
            others = [o for o in adv if o != name]
            if others:
                plans.append(("cross-attack", others))
            for setting, sources in plans:
                pos_train = [adv[s]["feats"][fs][adv[s]["keep"] & is_train] for s in sources]
                feats_tr = torch.cat([feats_benign[fs][is_train], *pos_train])
                labels = torch.cat(
                    [torch.zeros(int(is_train.sum())), torch.ones(sum(len(p) for p in pos_train))]
                )
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
    return {"rows": rows, "curves": curves, "train_images": train_idx, "test_images": test_idx}


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
    from .report import markdown_table

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
    from .io import write_text
    from .report import roc_grid, write_csv

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
    "clean images."
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
    """Rows for :func:`juap.report.map_panels`: per image and interpreter, the benign map then the map of
    each perturbation (``perturbations[interpreter][label]``), each on its own input, captioned with the
    predicted class.
    """
    from .budget import apply_perturbation

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
    from .experiments import load_perturbation
    from .io import load_tensors

    if not specs:
        raise ConfigError("juap detect needs at least one --perturbation FILE (or NAME=FILE)")
    out: Dict[str, torch.Tensor] = {}
    for name, path in parse_perturbation_specs(specs):
        n_hat = load_perturbation(path)
        if name is None:
            _, meta = load_tensors(path)
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
    from .data import load_splits, save_split, to_tensors
    from .experiments import _check_classes, build_classifier, build_interpreter
    from .report import map_panels
    from .runs import finish_run
    from .training import resolve_device

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
    _check_classes(clf, splits)
    names = list(dict.fromkeys(cfg.evaluate.interpreters))
    if cfg.evaluate.rts_checkpoint and "rts" not in names:
        names.append("rts")
    interps = {
        n: build_interpreter(n, clf, checkpoint=cfg.evaluate.rts_checkpoint if n == "rts" else None).to(
            device
        )
        for n in names
    }
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
    from .io import write_text
    from .report import map_panels

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
