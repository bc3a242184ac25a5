"""Result tables (Markdown, CSV) and figures (matplotlib, PNG) shaped like the paper's."""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .interpreters.base import normalize_maps, upsample_maps
from .io import atomic_path, write_text

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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


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
    import numpy as np

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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
