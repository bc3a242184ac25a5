"""The paper's claims, measured on the embedded data: each claim, its figures, and "holds" or "does not hold".

Runs the scaled-down experiments of ``configs/embedded/`` (Tables II-VI and a lambda sweep) with the
library's grid runner; cells are shared between the experiments and kept in ``--out``, so an
interrupted run continues where it stopped and a second run only re-reads the results. Then it checks:

1. UAP and GUAP change the maps (low IoU, high L1) under every interpreter.
2. JUAP's fooling ratio is within 5 points of GUAP's while its IoU is at least 0.1 higher and its L1
   lower, for each interpreter and both generators.
3. The result is robust to the threat model (L_inf vs L_2 of matched strength) and
4. to the objective (eq 7 vs eq 8; targeted R-JUAP-Ct vs GUAP-Ct).
5. JAP keeps a fooling ratio near PGD's with a higher IoU.
and draws the lambda trade-off (fooling ratio against IoU, with the Pareto front) to ``lambda.png``.

    python benchmarks/bench_claims.py [--out benchmarks/results/claims] [--only table2 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

from juap.grid import load_experiment, main_rows, run_grid, write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "embedded"
EXPERIMENTS = {
    "table2": "table2_fooling_ratio.yaml",
    "table3": "table3_discrepancy.yaml",
    "table4": "table4_jap_pgd.yaml",
    "table5": "table5_norms.yaml",
    "table6": "table6_objectives.yaml",
    "lambda": "lambda_sweep.yaml",
}
FR_GAP, IOU_GAIN, LOW_IOU, HIGH_L1, ROBUST = 0.05, 0.10, 0.60, 0.10, 0.10


def run_experiments(out: Path, names: Sequence[str], progress: bool) -> Dict[str, List[Mapping]]:
    rows: Dict[str, List[Mapping]] = {}
    done: List[Path] = []
    for name in names:
        exp = load_experiment(CONFIGS / EXPERIMENTS[name])
        run_dir = out / exp.name
        print(f"== {exp.name}: {exp.description}", flush=True)
        res = run_grid(exp, run_dir, merge=done, progress=progress, say=lambda s: print("  " + s, flush=True))
        write_results(exp, run_dir, res)
        rows[name] = main_rows(res["rows"])
        done.append(run_dir)
    return rows


def pick(rows, **match) -> Mapping | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


class Verdicts:
    def __init__(self) -> None:
        self.items: List[Dict] = []

    def check(self, claim: str, ok: bool, figures: str) -> None:
        self.items.append({"claim": claim, "holds": bool(ok), "figures": figures})
        print(f"  [{'holds' if ok else 'does not hold'}] {claim}: {figures}")


def judge(rows: Dict[str, List[Mapping]], v: Verdicts) -> None:
    t2 = rows.get("table2", [])
    interps = list(dict.fromkeys(r["interpreter"] for r in t2))
    if t2:
        print(
            "\nClaim 1: UAP and GUAP change the maps "
            f"(IoU <= {LOW_IOU} and L1 >= {HIGH_L1} under each interpreter)"
        )
        for method in ("UAP", "GUAP"):
            for i in interps:
                r = pick(t2, method=method, interpreter=i)
                if r:
                    v.check(
                        f"{method} changes {i} maps",
                        r["iou"] <= LOW_IOU and r["l1"] >= HIGH_L1,
                        f"FR {r['fooling_ratio']:.3f}, IoU {r['iou']:.3f}, L1 {r['l1']:.3f}",
                    )
        print(f"\nClaim 2: JUAP's FR within {FR_GAP:.2f} of GUAP's, IoU >= GUAP's + {IOU_GAIN}, L1 lower")
        for gen in ("R-JUAP", "U-JUAP"):
            for i in interps:
                j, g = pick(t2, method=gen, interpreter=i), pick(t2, method="GUAP", interpreter=i)
                if j and g:
                    fr_ok = j["fooling_ratio"] >= g["fooling_ratio"] - FR_GAP
                    iou_ok = j["iou"] >= g["iou"] + IOU_GAIN
                    l1_ok = j["l1"] < g["l1"]
                    parts = [n for n, ok in (("FR", fr_ok), ("IoU", iou_ok), ("L1", l1_ok)) if not ok]
                    v.check(
                        f"{gen} vs GUAP under {i}",
                        fr_ok and iou_ok and l1_ok,
                        f"FR {j['fooling_ratio']:.3f} vs {g['fooling_ratio']:.3f}, IoU {j['iou']:.3f} vs "
                        f"{g['iou']:.3f}, L1 {j['l1']:.3f} vs {g['l1']:.3f}"
                        + (f" (misses: {', '.join(parts)})" if parts else ""),
                    )
                    if j.get("iou_fooled") is not None and g.get("iou_fooled") is not None:
                        print(
                            f"    diagnostic, the fooled images only: IoU {j['iou_fooled']:.3f} vs "
                            f"{g['iou_fooled']:.3f}, L1 {j['l1_fooled']:.3f} vs {g['l1_fooled']:.3f}"
                        )
    t5 = rows.get("table5", [])
    if t5:
        print(f"\nClaim 3: robust to the threat model (|dFR| and |dIoU| <= {ROBUST}, L_inf vs L_2)")
        budgets = list(dict.fromkeys(r["budget"] for r in t5))
        for variant in dict.fromkeys(r["variant"] for r in t5):
            a, b = (pick(t5, variant=variant, budget=bd) for bd in budgets[:2])
            if a and b:
                dfr, diou = abs(a["fooling_ratio"] - b["fooling_ratio"]), abs(a["iou"] - b["iou"])
                v.check(
                    f"{variant}: {budgets[0]} vs {budgets[1]}",
                    dfr <= ROBUST and diou <= ROBUST,
                    f"FR {a['fooling_ratio']:.3f} / {b['fooling_ratio']:.3f}, "
                    f"IoU {a['iou']:.3f} / {b['iou']:.3f}",
                )
    t6 = rows.get("table6", [])
    if t6:
        print(f"\nClaim 4: robust to the objective (CE vs Cmin within {ROBUST}); R-JUAP-Ct vs GUAP-Ct")
        ce, cmin = pick(t6, objective="untargeted"), pick(t6, objective="least_likely")
        if ce and cmin:
            v.check(
                "R-JUAP-CE vs R-JUAP-Cmin",
                abs(ce["fooling_ratio"] - cmin["fooling_ratio"]) <= ROBUST
                and abs(ce["iou"] - cmin["iou"]) <= ROBUST,
                f"FR {ce['fooling_ratio']:.3f} / {cmin['fooling_ratio']:.3f}, "
                f"IoU {ce['iou']:.3f} / {cmin['iou']:.3f}",
            )
        jt, gt = (
            pick(t6, objective="targeted", method="R-JUAP"),
            pick(t6, method="GUAP-Ct", interpreter="cam"),
        )
        if jt and gt:
            v.check(
                "R-JUAP-Ct vs GUAP-Ct: similar target success, higher IoU, lower L1",
                jt["target_success_rate"] >= gt["target_success_rate"] - FR_GAP
                and jt["iou"] > gt["iou"]
                and jt["l1"] < gt["l1"],
                f"target success {jt['target_success_rate']:.3f} vs {gt['target_success_rate']:.3f}, "
                f"IoU {jt['iou']:.3f} vs {gt['iou']:.3f}, L1 {jt['l1']:.3f} vs {gt['l1']:.3f}",
            )
    t4 = rows.get("table4", [])
    if t4:
        print(f"\nClaim 5: JAP keeps FR within {FR_GAP:.2f} of PGD's with a higher IoU (Grad-CAM)")
        p, j = pick(t4, method="PGD", interpreter="gradcam"), pick(t4, method="JAP", interpreter="gradcam")
        if p and j:
            v.check(
                "JAP vs PGD",
                j["fooling_ratio"] >= p["fooling_ratio"] - FR_GAP and j["iou"] > p["iou"],
                f"FR {j['fooling_ratio']:.3f} vs {p['fooling_ratio']:.3f}, IoU {j['iou']:.3f} vs "
                f"{p['iou']:.3f}, L1 {j['l1']:.3f} vs {p['l1']:.3f}",
            )


def lambda_plot(rows: List[Mapping], guap: List[Mapping], path: Path) -> None:
    """Fooling ratio against IoU for each lambda, per interpreter, with the Pareto front and GUAP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from juap.io import atomic_path

    interps = list(dict.fromkeys(r["interpreter"] for r in rows))
    fig, axes = plt.subplots(1, len(interps), figsize=(4.2 * len(interps), 3.6), squeeze=False)
    print("\nLambda trade-off (R-JUAP): lambda -> FR, IoU")
    for ax, interp in zip(axes[0], interps, strict=True):
        pts = sorted(
            (
                (float(r["setting"].split("=")[1]), r["fooling_ratio"], r["iou"])
                for r in rows
                if r["interpreter"] == interp
            ),
        )
        for lam, fr, iou in pts:
            print(f"  {interp:<8} lambda={lam:<5g} FR {fr:.3f}  IoU {iou:.3f}")
        front = [p for p in pts if not any(q[1] >= p[1] and q[2] >= p[2] and q != p for q in pts)]
        front.sort(key=lambda p: p[2])
        ax.plot([p[2] for p in front], [p[1] for p in front], "-", color="tab:orange", label="Pareto front")
        ax.scatter([p[2] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3, label="R-JUAP")
        for lam, fr, iou in pts:
            ax.annotate(f"λ={lam:g}", (iou, fr), fontsize=7, xytext=(3, 3), textcoords="offset points")
        g = pick(guap, method="GUAP", interpreter=interp)
        if g:
            ax.scatter([g["iou"]], [g["fooling_ratio"]], marker="x", color="black", zorder=3, label="GUAP")
        ax.set_xlabel(f"{interp} map IoU (higher: maps kept)")
        ax.set_ylabel("fooling ratio")
        ax.set_title(f"JUAP against {interp}: the lambda trade-off", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "claims"))
    ap.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    ap.add_argument("--progress", action="store_true", help="show per-attack progress bars")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    rows = run_experiments(out, args.only, progress=args.progress)
    print(f"\nThe paper's claims on the embedded data ({time.perf_counter() - t0:.0f} s; results in {out}):")
    verdicts = Verdicts()
    judge(rows, verdicts)
    if "lambda" in rows:
        lambda_plot(rows["lambda"], rows.get("table2", []), out / "lambda.png")
        print(f"  plot: {out / 'lambda.png'}")
    held = sum(i["holds"] for i in verdicts.items)
    print(f"\n{held} of {len(verdicts.items)} checks hold.")
    from juap.io import write_json

    write_json(
        out / "claims.json",
        {
            "checks": verdicts.items,
            "thresholds": {
                "fr_gap": FR_GAP,
                "iou_gain": IOU_GAIN,
                "low_iou": LOW_IOU,
                "high_l1": HIGH_L1,
                "robust": ROBUST,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
