"""Result tables (Markdown, CSV) and figures (matplotlib, PNG) shaped like the paper's."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..interpreters.base import upsample_maps
from ..metrics import normalize_maps
from ..runtime.io import atomic_path, write_text

CSV_COLUMNS = ("method", "generator", "interpreter", "norm", "fooling_ratio", "l1", "iou")


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str] = CSV_COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _rgb(x: torch.Tensor):
    return x.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def figure_grid(
    path: str | os.PathLike,
    *,
    image: torch.Tensor,
    rows: List[Dict],
    title: str = "",
    class_names: Optional[Sequence[str]] = None,
) -> None:
    """A Fig. 4-style grid: per row (method x interpreter) the benign image, the adversarial image, the
    benign map and the adversarial map (maps min-max normalised and overlaid on their images).

    Args:
        image: the benign image (3, H, W).
        rows: dicts with ``label``, ``x_adv`` (3, H, W), ``benign_map`` / ``adv_map`` (h, w),
            ``benign_pred`` / ``adv_pred`` (int).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = (lambda c: class_names[c]) if class_names else str
    size = image.shape[-2:]
    fig, axes = plt.subplots(len(rows), 4, figsize=(7.2, 1.85 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        bm = upsample_maps(normalize_maps(row["benign_map"][None]), size)[0].cpu().numpy()
        am = upsample_maps(normalize_maps(row["adv_map"][None]), size)[0].cpu().numpy()
        panels = [
            (_rgb(image), None, f"benign: {name(row['benign_pred'])}"),
            (_rgb(row["x_adv"]), None, f"adversarial: {name(row['adv_pred'])}"),
            (_rgb(image), bm, "benign map"),
            (_rgb(row["x_adv"]), am, "adversarial map"),
        ]
        for c, (img, heat, caption) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=7)
    save_figure(fig, path, dpi=130, title=title)


def bar_chart(
    path: str | os.PathLike,
    *,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str = "",
) -> None:
    """Grouped bars (Fig. 5 style): one group per interpreter, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.8 / max(len(series), 1)
    xs = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(xs + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(xs, groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=130)


def roc_grid(
    path: str | os.PathLike,
    panels: Mapping[str, Mapping[str, Mapping[str, Sequence]]],
    *,
    aurocs: Optional[Mapping[tuple, float]] = None,
    title: str = "ROC curves: benign vs adversarial, per interpreter (rows) and detector (columns)",
) -> None:
    """ROC curves in a grid: one row per interpreter, one column per detector, one line per attack.

    Args:
        panels: ``{interpreter: {detector: {attack: (fpr, tpr)}}}`` (1-D tensors or sequences).
        aurocs: ``{(interpreter, detector, attack): auroc}`` for the legends.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(panels)
    cols: List[str] = []
    for r in rows:
        cols += [d for d in panels[r] if d not in cols]
    fig, axes = plt.subplots(
        max(len(rows), 1),
        max(len(cols), 1),
        figsize=(2.3 * max(len(cols), 1), 2.3 * max(len(rows), 1) + 0.4),
        squeeze=False,
    )
    for i, interp in enumerate(rows):
        for j, det in enumerate(cols):
            ax = axes[i][j]
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
            for attack, (fpr, tpr) in panels[interp].get(det, {}).items():
                auc = (aurocs or {}).get((interp, det, attack))
                label = attack + (f" {auc:.2f}" if auc is not None else "")
                ax.step([float(v) for v in fpr], [float(v) for v in tpr], where="post", lw=1.2, label=label)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.tick_params(labelsize=6)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5.5, loc="lower right")
            if i == 0:
                ax.set_title(det, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{interp}\nTPR", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("FPR", fontsize=7)
    save_figure(fig, path, dpi=110, title=title)


def map_panels(path: str | os.PathLike, rows: Sequence[Mapping], *, title: str = "") -> None:
    """A grid of images with their maps overlaid (Fig. 1 style): one row per entry of ``rows``.

    Args:
        rows: dicts with ``label`` and ``panels``, a list of ``(image (3, H, W), map (h, w) or None,
            caption)``; maps are min-max normalised and upsampled to the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max((len(r["panels"]) for r in rows), default=1)
    fig, axes = plt.subplots(
        max(len(rows), 1), ncol, figsize=(1.8 * ncol, 1.85 * max(len(rows), 1) + 0.4), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row["panels"]):
                ax.axis("off")
                continue
            img, heat, caption = row["panels"][c]
            ax.imshow(_rgb(img))
            if heat is not None:
                hm = upsample_maps(normalize_maps(heat[None].float()), img.shape[-2:])[0].cpu().numpy()
                ax.imshow(hm, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=7)
    save_figure(fig, path, dpi=120, title=title)


def transitions_csv(
    path: str | os.PathLike, transitions: Sequence[Sequence[int]], class_names: Optional[Sequence[str]] = None
) -> None:
    """``transitions.csv``: a row per benign predicted class, a column per adversarial predicted class,
    image counts in the cells (the diagonal: images not fooled); classes by name when known, else index.
    """
    names = list(class_names) if class_names else [str(c) for c in range(len(transitions))]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["benign\\adversarial", *names])
    for name, row in zip(names, transitions, strict=True):
        w.writerow([name, *(int(v) for v in row)])
    write_text(path, buf.getvalue())


def transition_heatmaps(
    path: str | os.PathLike,
    matrices: Mapping[str, Sequence[Sequence[int]]],
    *,
    class_names: Optional[Sequence[str]] = None,
    title: str = "",
) -> None:
    """Where the fooled images go: one heat map per perturbation of its benign -> adversarial predictions.

    Colour is the share of each benign class's images (row-normalised, so a small class reads like a
    large one); each cell is labelled with its count. The diagonal holds the images not fooled.

    Args:
        matrices: ``{label: K x K counts}``, rows the benign and columns the adversarial prediction.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(matrices)
    k = len(next(iter(matrices.values()))) if matrices else 0
    names = list(class_names) if class_names else [str(c) for c in range(k)]
    side = 1.2 + 0.42 * k
    fig, axes = plt.subplots(
        1, max(len(labels), 1), figsize=(side * max(len(labels), 1), side), squeeze=False
    )
    for ax, label in zip(axes[0], labels, strict=False):
        counts = torch.tensor(matrices[label], dtype=torch.float64)  # (K, K)
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), cmap="magma", vmin=0, vmax=1)
        for b in range(k):
            for a in range(k):
                colour = "black" if share[b, a] > 0.6 else "white"
                ax.text(a, b, f"{int(counts[b, a])}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_xticks(range(k), names, rotation=90, fontsize=6)
        ax.set_yticks(range(k), names, fontsize=6)
        ax.set_xlabel("adversarial prediction", fontsize=7)
        ax.set_ylabel("benign prediction", fontsize=7)
        fooled = counts.sum() - counts.diag().sum()
        ax.set_title(f"{label} ({int(fooled)} of {int(counts.sum())} fooled)", fontsize=7)
    save_figure(fig, path, dpi=130, title=title)


def transition_section(
    run_dir: str | os.PathLike,
    matrices: Mapping[str, Sequence[Sequence[int]]],
    class_names: Optional[Sequence[str]] = None,
    *,
    figure: str = "transitions.png",
) -> str:
    """A results.md section on where the fooled images go: draws ``run_dir/figure`` (one heat map per
    perturbation, :func:`transition_heatmaps`) and returns the Markdown (per perturbation: the fooling
    ratio, the dominant adversarial label and its share of the fooled images, the class fooled most).

    Args:
        matrices: ``{label: K x K counts}`` (``evaluate(..., per_class=True)["transitions"]``).
    """

    name = (lambda c: class_names[c]) if class_names else str
    transition_heatmaps(
        Path(run_dir) / figure,
        matrices,
        class_names=class_names,
        title="benign -> adversarial predictions (colour: share of the benign class)",
    )
    rows = []
    for label, t in matrices.items():
        t = torch.tensor(t, dtype=torch.long)  # (K, K)
        n_b, kept = t.sum(1), t.diag()
        into = t.sum(0) - kept  # fooled images landing in each class
        fooled = int(into.sum())
        top = int(into.argmax())  # lowest index on a tie, as evaluate()
        fr_b = (n_b - kept).double() / n_b.clamp_min(1)
        fr_b[n_b == 0] = -1.0  # a class no image was predicted as is neither most nor least fooled
        most = int(fr_b.argmax())
        rows.append(
            [
                label,
                fooled / max(int(t.sum()), 1),
                name(top) if fooled else None,
                int(into[top]) / fooled if fooled else None,
                f"{name(most)} ({float(fr_b[most]):.2f})" if fooled else None,
            ]
        )
    header = [
        "perturbation",
        "fooling ratio",
        "dominant label",
        "its share of the fooled",
        "most fooled class",
    ]
    return (
        "\n## Where the fooled images go\n\nRows: the class the classifier predicts for the benign image; "
        "columns: the class it predicts once perturbed (the diagonal: images not fooled). A universal "
        "perturbation that sends most fooled images to one class has a *dominant label*. Classes here are "
        "the benign predictions, not the labels.\n\n"
        + markdown_table(header, rows)
        + f"\n\n![transitions]({figure})\n"
    )


def save_figure(fig, path: str | os.PathLike, *, dpi: int, title: str = "") -> None:
    """Title, tight layout, an atomic PNG write, and the figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
