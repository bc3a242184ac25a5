"""The report of `juap evade`: can a map-based inspector be evaded? Tables, sanity flags and plots.

Reads the rows of :func:`juap.commands.evade.run_evade` (one per cell x detector x perturbation) and
writes ``results.md``, ``evasion.csv``, ``evasion.json`` and the figures. Every detection figure stands
beside its adaptive one (SPEC section 5): the non-adaptive row is round 0's detector against R-JUAP, the
adaptive one is the same detector against JUAP trained to stay under its threshold.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..runtime.io import write_json, write_text
from .report import markdown_table, roc_grid, save_figure, write_csv

COLUMNS = (
    "seed", "norm", "eps", "interpreter", "detector", "detector_round", "perturbation", "attack",
    "attack_round", "against", "adaptive", "auroc", "tpr_1", "tpr_fpr", "threshold", "fpr", "test_fpr",
    "fooling_ratio", "evasion_rate", "n_test",
)  # fmt: skip

# tolerances of the sanity flags (evasion-rate units)
MONOTONE_SLACK = 0.05
NEAR_TOTAL = 0.9  # of the fooling ceiling (the most any perturbation of the cell fools)
STEPS_SLACK = 0.10


def _pick(rows, **want) -> List[Mapping[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def _stat(values: Sequence[Optional[float]]) -> Optional[str]:
    """``mean`` (one seed) or ``mean ± sd`` (several); ``None`` when there is no value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def _budgets(rows) -> List[Tuple[str, float]]:
    return sorted({(r["norm"], r["eps"]) for r in rows}, key=lambda b: (b[0] != "linf", b[1]))


def _groups(rows) -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    for r in rows:
        if (r["interpreter"], r["detector"]) not in out:
            out.append((r["interpreter"], r["detector"]))
    return out


def _last_round(rows, interp, kind, norm, eps) -> int:
    rounds = [r["detector_round"] for r in _pick(rows, interpreter=interp, detector=kind, norm=norm, eps=eps)]
    return max(rounds) if rounds else 0


def evasion_of(rows, *, interp, kind, norm, eps, det_round, perturbation, field="evasion_rate"):
    """The values of ``field`` over seeds for one detector (kind, round) against one perturbation."""
    return [
        r[field]
        for r in _pick(
            rows,
            interpreter=interp,
            detector=kind,
            detector_round=det_round,
            perturbation=perturbation,
            norm=norm,
            eps=eps,
        )
    ]


def round0(rows, interp, kind, norm, eps, perturbation, field="evasion_rate") -> Optional[float]:
    """The mean over seeds of ``field`` for round 0's detector ``kind`` against one perturbation."""
    one = dict(interp=interp, kind=kind, norm=norm, eps=eps, det_round=0, perturbation=perturbation)
    return _mean(evasion_of(rows, **one, field=field))


# -- tables --------------------------------------------------------------------------------------------
def headline_table(rows, norm: str, eps: float) -> str:
    """Per interpreter x detector at one budget: detection of R-JUAP, then the evasion rate non-adaptive,
    adaptive (round 1), and at the last round before and after the detector is retrained."""
    header = [
        "interpreter",
        "detector",
        "AUROC (R-JUAP)",
        "TPR@FPR (R-JUAP)",
        "FR (R-JUAP)",
        "evasion non-adaptive",
        "evasion adaptive r1",
        "FR adaptive r1",
        "last round k",
        "evasion r_k vs detector r_k-1",
        "evasion r_k vs retrained r_k",
    ]
    table = []
    for interp, kind in _groups(rows):
        k = _last_round(rows, interp, kind, norm, eps)
        one = dict(interp=interp, kind=kind, norm=norm, eps=eps)
        last = f"JUAP@{kind}-r{k}"
        table.append(
            [
                interp,
                kind,
                _stat(evasion_of(rows, **one, det_round=0, perturbation="R-JUAP", field="auroc")),
                _stat(evasion_of(rows, **one, det_round=0, perturbation="R-JUAP", field="tpr_fpr")),
                _stat(evasion_of(rows, **one, det_round=0, perturbation="R-JUAP", field="fooling_ratio")),
                _stat(evasion_of(rows, **one, det_round=0, perturbation="R-JUAP")),
                _stat(evasion_of(rows, **one, det_round=0, perturbation=f"JUAP@{kind}-r1")),
                _stat(
                    evasion_of(
                        rows, **one, det_round=0, perturbation=f"JUAP@{kind}-r1", field="fooling_ratio"
                    )
                ),
                k,
                _stat(evasion_of(rows, **one, det_round=k - 1, perturbation=last)) if k else None,
                _stat(evasion_of(rows, **one, det_round=k, perturbation=last)) if k else None,
            ]
        )
    return markdown_table(header, table)


def budget_table(rows, field: str = "evasion_rate") -> str:
    """``field`` against the budget: per interpreter x detector, non-adaptive / adaptive per budget."""
    budgets = _budgets(rows)
    header = ["interpreter", "detector"] + [f"{n} {e:g}" for n, e in budgets]
    table = []
    for interp, kind in _groups(rows):
        line = [interp, kind]
        for norm, eps in budgets:
            a = round0(rows, interp, kind, norm, eps, "R-JUAP", field)
            b = round0(rows, interp, kind, norm, eps, f"JUAP@{kind}-r1", field)
            line.append(f"{_fmt(a)} / {_fmt(b)}")
        table.append(line)
    return markdown_table(header, table)


def rounds_table(rows, norm: str, eps: float) -> str:
    """The arms race at one budget: per round r, the adaptive attacks against round r-1's detector and the
    retrained detector of round r against them."""
    header = [
        "interpreter",
        "detector",
        "round",
        "attack",
        "FR",
        "evasion vs r-1 detector",
        "AUROC of retrained r",
        "evasion vs retrained r",
    ]
    table = []
    for interp, kind in _groups(rows):
        for r in range(1, _last_round(rows, interp, kind, norm, eps) + 1):
            for attack in ("JUAP", "GUAP"):
                name = f"{attack}@{kind}-r{r}"
                one = dict(interp=interp, kind=kind, norm=norm, eps=eps, perturbation=name)
                if not evasion_of(rows, **one, det_round=r - 1):
                    continue
                table.append(
                    [
                        interp,
                        kind,
                        r,
                        attack,
                        _stat(evasion_of(rows, **one, det_round=r - 1, field="fooling_ratio")),
                        _stat(evasion_of(rows, **one, det_round=r - 1)),
                        _stat(evasion_of(rows, **one, det_round=r, field="auroc")),
                        _stat(evasion_of(rows, **one, det_round=r)),
                    ]
                )
    return markdown_table(header, table)


def matrix_table(rows, norm: str, eps: float, interp: str, seed: int) -> str:
    """Evasion rate of every perturbation (columns) under every detector of the cell (rows)."""
    cell = _pick(rows, norm=norm, eps=eps, interpreter=interp, seed=seed)
    perts: List[str] = []
    dets: List[Tuple[str, int]] = []
    for r in cell:
        perts += [r["perturbation"]] if r["perturbation"] not in perts else []
        dets += (
            [(r["detector"], r["detector_round"])] if (r["detector"], r["detector_round"]) not in dets else []
        )
    value = {(r["detector"], r["detector_round"], r["perturbation"]): r["evasion_rate"] for r in cell}
    table = [[f"{k}-r{d}"] + [value.get((k, d, p)) for p in perts] for k, d in dets]
    return markdown_table(["detector \\ perturbation"] + perts, table)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def fooling_ceiling(rows, interp: str, norm: str, eps: float) -> float:
    """The highest fooling ratio any perturbation of the cell reaches (mean over seeds): what a
    universal perturbation can fool at all at this budget, and so the most it can evade. On few classes
    it stays below 1: the images of the class a perturbation pushes towards are not fooled by it."""
    perts = {r["perturbation"] for r in _pick(rows, interpreter=interp, norm=norm, eps=eps)} - {"noise"}
    frs = [
        _mean(
            r["fooling_ratio"]
            for r in _pick(rows, interpreter=interp, norm=norm, eps=eps, perturbation=p, detector_round=0)
        )  # fmt: skip
        for p in perts
    ]
    return max((f for f in frs if f is not None), default=1.0)


def best_adaptive(rows, interp: str, kind: str, norm: str, eps: float) -> Optional[float]:
    """The mean evasion rate of the strongest round-1 adaptive attack (JUAP or GUAP, whichever ran and
    evades more) against round 0's detector ``kind``: the attacker picks its best."""
    values = [round0(rows, interp, kind, norm, eps, f"{a}@{kind}-r1") for a in ("JUAP", "GUAP")]
    return max((v for v in values if v is not None), default=None)


# -- the sanity checks ---------------------------------------------------------------------------------
def sanity_flags(rows) -> List[Dict[str, Any]]:
    """Carlini et al. 2019's checks as flags (``ok`` / ``CHECK``), per interpreter x detector (x seed):
    evasion monotone in the budget and near-total at the largest budget (at least 90% of the highest fooling
    ratio any perturbation reaches there, :func:`fooling_ceiling`), both for the stronger adaptive attack
    (:func:`best_adaptive`), the adaptive attack at least as evasive
    as the non-adaptive R-JUAP at every budget and seed, doubled steps or a restart change it
    little, halved steps do not do better, the noise control of the same norm evades less."""
    flags = []

    def flag(name, ok, interp, kind, detail, seed=None):
        flags.append(
            {
                "check": name,
                "status": "ok" if ok else "CHECK",
                "interpreter": interp,
                "detector": kind,
                "seed": seed,
                "detail": detail,
            }
        )

    for interp, kind in _groups(rows):
        for norm in sorted({r["norm"] for r in rows}):
            curve = [
                (eps, best_adaptive(rows, interp, kind, norm, eps)) for n, eps in _budgets(rows) if n == norm
            ]
            curve = [(e, v) for e, v in curve if v is not None]
            if len(curve) >= 2:
                drops = [
                    (a, b) for (a, b) in zip(curve, curve[1:], strict=False) if b[1] < a[1] - MONOTONE_SLACK
                ]
                detail = ", ".join(f"{e:g}: {v:.2f}" for e, v in curve)
                flag(f"evasion monotone in the {norm} budget", not drops, interp, kind, detail)
            if len(curve) >= 2:  # a sweep: its largest budget should leave the detector nothing
                eps, v = curve[-1]
                ceiling = fooling_ceiling(rows, interp, norm, eps)
                detail = f"{v:.2f} of a fooling ceiling of {ceiling:.2f} ({v / max(ceiling, 1e-9):.0%})"
                for attack in ("JUAP", "GUAP"):  # how much of what each fools it evades
                    fr = round0(rows, interp, kind, norm, eps, f"{attack}@{kind}-r1", "fooling_ratio")
                    ev = round0(rows, interp, kind, norm, eps, f"{attack}@{kind}-r1")
                    if fr:
                        detail += f"; {attack}@{kind}-r1 evades {ev:.2f} of the {fr:.2f} it fools"
                flag(f"near-total evasion at {norm} {eps:g}", v >= NEAR_TOTAL * ceiling, interp, kind, detail)
        for r in _pick(rows, interpreter=interp, detector=kind, detector_round=0, perturbation="R-JUAP"):
            # knowing the detector must not make the attacker weaker: per seed, where a mean would hide it
            where = dict(norm=r["norm"], eps=r["eps"], seed=r["seed"])
            ref = _pick(rows, interpreter=interp, detector=kind, detector_round=0,
                        perturbation=f"JUAP@{kind}-r1", **where)  # fmt: skip
            if ref:
                plain, adaptive = r["evasion_rate"], ref[0]["evasion_rate"]
                detail = f"adaptive {adaptive:.2f} vs non-adaptive {plain:.2f} ({r['norm']} {r['eps']:g})"
                ok = adaptive >= plain - MONOTONE_SLACK
                name = "the adaptive attack evades at least as much as R-JUAP"
                flag(name, ok, interp, kind, detail, r["seed"])
        for r in _pick(rows, interpreter=interp, detector=kind, detector_round=0):
            name = r["perturbation"]
            base = f"JUAP@{kind}-r1"
            ref = _pick(
                rows,
                interpreter=interp,
                detector=kind,
                detector_round=0,
                perturbation=base,
                norm=r["norm"],
                eps=r["eps"],
                seed=r["seed"],
            )
            if not ref or not name.startswith(base + "-"):
                continue
            e0, e = ref[0]["evasion_rate"], r["evasion_rate"]
            detail = f"{e:.2f} vs {e0:.2f} ({r['norm']} {r['eps']:g})"
            if name.endswith("2x-steps"):
                flag(
                    "doubling the steps changes evasion little",
                    abs(e - e0) <= STEPS_SLACK,
                    interp,
                    kind,
                    detail,
                    r["seed"],
                )
            elif name.endswith("half-steps"):
                flag(
                    "halving the steps does not evade more",
                    e <= e0 + MONOTONE_SLACK,
                    interp,
                    kind,
                    detail,
                    r["seed"],
                )
            elif name.endswith("restart"):
                flag(
                    "a restart changes evasion little",
                    abs(e - e0) <= STEPS_SLACK,
                    interp,
                    kind,
                    detail,
                    r["seed"],
                )
        for r in _pick(rows, interpreter=interp, detector=kind, detector_round=0, perturbation="noise"):
            ref = _pick(
                rows,
                interpreter=interp,
                detector=kind,
                detector_round=0,
                perturbation=f"JUAP@{kind}-r1",
                norm=r["norm"],
                eps=r["eps"],
                seed=r["seed"],
            )
            if ref:
                e, e0 = r["evasion_rate"], ref[0]["evasion_rate"]
                detail = f"noise {e:.2f} (FR {r['fooling_ratio']:.2f}) vs adaptive {e0:.2f}"
                flag(
                    "a noise control of the same norm evades less",
                    e <= e0,
                    interp,
                    kind,
                    detail,
                    r["seed"],
                )
    return flags


# -- figures -------------------------------------------------------------------------------------------
def budget_plot(path: Path, rows, field: str, ylabel: str) -> None:
    """``field`` against the budget, one panel per interpreter x norm, one colour per detector; dashed:
    round 0's detector against R-JUAP (non-adaptive), solid: against JUAP trained to evade it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    interps = list(dict.fromkeys(r["interpreter"] for r in rows))
    norms = sorted({r["norm"] for r in rows})
    fig, axes = plt.subplots(
        len(interps),
        len(norms),
        figsize=(max(4.8, 3.6 * len(norms)), 3.0 * len(interps) + 0.4),
        squeeze=False,
    )
    for i, interp in enumerate(interps):
        for j, norm in enumerate(norms):
            ax = axes[i][j]
            eps = [e for n, e in _budgets(rows) if n == norm]
            for c, kind in enumerate(k for it, k in _groups(rows) if it == interp):
                color = f"C{c}"
                for pert, style, tag in (
                    ("R-JUAP", "--", "non-adaptive"),
                    (f"JUAP@{kind}-r1", "-", "adaptive"),
                ):
                    ys = [round0(rows, interp, kind, norm, e, pert, field) for e in eps]
                    pts = [(e, y) for e, y in zip(eps, ys, strict=False) if y is not None]
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=False),
                            style,
                            color=color,
                            marker="o",
                            ms=3,
                            label=f"{kind} {tag}",
                        )
            ax.set_xscale("log")
            ax.set_xticks(eps)
            ax.set_xticklabels([f"{e:g}" for e in eps])
            ax.minorticks_off()
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"{norm} budget (0-255 units)", fontsize=7)
            ax.set_ylabel(f"{interp}: {ylabel}", fontsize=7)
            ax.tick_params(labelsize=6)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5, loc="best")
    save_figure(
        fig,
        path,
        dpi=110,
        title=f"{ylabel} against the budget\n(dashed: non-adaptive, solid: adaptive round 1)",
    )


def rounds_plot(path: Path, rows, norm: str, eps: float) -> None:
    """The evasion rate across the arms race at one budget: round r's JUAP against round r-1's detector
    (solid) and against the detector retrained on it (dotted), one colour per detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for c, (interp, kind) in enumerate(groups):
        k = _last_round(rows, interp, kind, norm, eps)
        one = dict(interp=interp, kind=kind, norm=norm, eps=eps)
        xs = list(range(0, k + 1))
        before = [
            _mean(
                evasion_of(
                    rows,
                    **one,
                    det_round=max(r - 1, 0),
                    perturbation="R-JUAP" if r == 0 else f"JUAP@{kind}-r{r}",
                )
            )
            for r in xs
        ]
        after = [
            _mean(
                evasion_of(rows, **one, det_round=r, perturbation="R-JUAP" if r == 0 else f"JUAP@{kind}-r{r}")
            )
            for r in xs
        ]
        ax.plot(xs, [_nan(v) for v in before], "-o", color=f"C{c}", ms=3, label=f"{interp} {kind}")
        ax.plot(xs, [_nan(v) for v in after], ":", color=f"C{c}")
    ax.set_xticks(range(0, max((_last_round(rows, i, k, norm, eps) for i, k in groups), default=0) + 1))
    ax.set_xlabel("round", fontsize=7)
    ax.set_ylabel("evasion rate", fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=5)
    save_figure(fig, path, dpi=110, title=f"arms race at {norm} {eps:g} (dotted: after retraining)")


def _nan(v: Optional[float]) -> float:
    return float("nan") if v is None else v


def roc_plot(path: Path, curves: Mapping[str, Mapping[str, Any]]) -> None:
    """ROC of round 0's detectors against R-JUAP and against the round-1 adaptive perturbations, one row
    per cell (budget x interpreter, first seed), one column per detector."""
    seeds = sorted({c.rsplit("_s", 1)[-1] for c in curves}, key=int)
    panels: Dict[str, Dict[str, Dict[str, Tuple]]] = {}
    for cell_id, cell_curves in curves.items():
        if not seeds or cell_id.rsplit("_s", 1)[-1] != seeds[0]:
            continue
        for key, (fpr, tpr) in cell_curves.items():
            kind, pert = key.split("|", 1)
            panels.setdefault(cell_id.rsplit("_s", 1)[0], {}).setdefault(kind, {})[pert] = (fpr, tpr)
    if panels:
        roc_grid(path, panels, title="ROC per budget: round-0 detectors vs R-JUAP and vs adaptive JUAP/GUAP")


# -- the report ----------------------------------------------------------------------------------------
NOTE = (
    "Threat model (SPEC section 5): the detector sees only the suspect input; the attacker knows the "
    "classifier, the interpreter and the detector with its threshold (white box). Thresholds are "
    "calibrated on held-out clean images at the FPR shown; the **evasion rate** is the fraction of the "
    "test images that the perturbation fools *and* that score under the threshold. *Non-adaptive*: round "
    "0's detector (trained on UAP, SGD-UAP, GUAP and R-JUAP) against R-JUAP. *Adaptive r1*: the same "
    "detector against JUAP trained with the detector's score in its loss. *Round k*: the attack against "
    "the detector of round k-1, then the detector retrained on every perturbation so far."
)


def write_evasion_report(run_dir: Path, rows, curves, settings, *, complete: bool) -> Dict[str, Any]:
    """Write ``evasion.csv``, ``evasion.json``, ``results.md`` and the figures; return the flags."""
    write_csv(run_dir / "evasion.csv", rows, columns=COLUMNS)
    flags = sanity_flags(rows) if rows else []
    write_json(run_dir / "evasion.json", {"rows": rows, "flags": flags, "complete": complete})
    if not rows:
        write_text(
            run_dir / "results.md", "# Can map-based inspection be evaded?\n\nNo cell has finished yet.\n"
        )
        return {"flags": flags}
    h = settings.headline
    first = _pick(rows, norm=h.norm, eps=h.eps)
    parts = [
        "# Can map-based inspection be evaded?\n",
        (
            ""
            if complete
            else "**Partial**: not every cell has finished; run the command again to continue.\n"
        ),
        NOTE + "\n",
        f"## At the headline budget ({h.norm} {h.eps:g}, thresholds at {settings.fpr:.0%} FPR)\n",
        headline_table(rows, h.norm, h.eps) if first else "(the headline cell has not finished)",
        "\n## Evasion rate against the budget (non-adaptive / adaptive r1)\n",
        budget_table(rows),
        "\n![evasion against the budget](evasion_vs_budget.png)\n",
        "\n## AUROC against the budget (non-adaptive / adaptive r1)\n",
        budget_table(rows, field="auroc"),
        "\n![AUROC against the budget](auroc_vs_budget.png)\n\n![ROC per budget](roc.png)\n",
        f"\n## The arms race ({h.norm} {h.eps:g})\n",
        rounds_table(rows, h.norm, h.eps) if first else "-",
        "\n![evasion across rounds](rounds.png)\n",
    ]
    if first:
        seed, interp = first[0]["seed"], first[0]["interpreter"]
        parts += [
            f"\n## Every detector against every perturbation ({interp}, {h.norm} {h.eps:g}, seed {seed}; "
            "evasion rate)\n",
            matrix_table(rows, h.norm, h.eps, interp, seed),
        ]
    parts += [
        "\n## Sanity checks (Carlini et al. 2019)\n",
        markdown_table(
            ["check", "status", "interpreter", "detector", "seed", "detail"],
            [[f[k] for k in ("check", "status", "interpreter", "detector", "seed", "detail")] for f in flags],
        )
        if flags
        else "(none ran)",
    ]
    write_text(run_dir / "results.md", "\n".join(parts) + "\n")
    budget_plot(run_dir / "evasion_vs_budget.png", rows, "evasion_rate", "evasion rate")
    budget_plot(run_dir / "auroc_vs_budget.png", rows, "auroc", "AUROC")
    if first:
        rounds_plot(run_dir / "rounds.png", rows, h.norm, h.eps)
    roc_plot(run_dir / "roc.png", curves)
    return {"flags": flags}
