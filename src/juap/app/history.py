"""What a training loop leaves in its run folder: ``history.csv``, ``curves.png`` and TensorBoard events.

:class:`RunLog` is the ``log`` a command hands to a trainer (``attack.fit(..., log=RunLog(run_dir))``);
the loop engine (:mod:`juap.runtime.loop`) calls it with every history row, and on resume with the rows
saved in the checkpoint, so a resumed run continues the same files. Under torchrun only rank 0 logs.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.tensorboard import SummaryWriter

from ..errors import ConfigError
from ..runtime.io import write_text
from .artifacts import amplify
from .report import save_figure

HISTORY_NAME, CURVES_NAME, TENSORBOARD_DIR = "history.csv", "curves.png", "tensorboard"
_WRITE_EVERY = 50  # rows between rewrites of history.csv (and at every validation row, and at the end)
_STEP_KEYS = ("step", "epoch", "pass")
# plotted on the [0, 1] panel; the other ratios of a validation (clean accuracy, IoU at each k, ...) are
# in history.csv only, so that the panel stays readable
_RATIOS = ("fooling_ratio", "val_iou", "target_success_rate", "at_hinge", "accuracy", "val_accuracy")
_RATES = ("lam", "lr")


def flatten(row: Mapping[str, Any]) -> Dict[str, Any]:
    """One level of nesting: ``{"val": {"iou": 0.5}}`` becomes ``{"val_iou": 0.5}``; scalars only."""
    out: Dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, Mapping):
            out.update({f"{k}_{k2}": v2 for k2, v2 in v.items() if _scalar(v2)})
        elif _scalar(v) or isinstance(v, str):
            out[k] = v
    return out


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RunLog:
    """The history of one training loop, written into ``run_dir``.

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard events (the same scalars, and the perturbation image at every
            validation) to ``run_dir/tensorboard/``; needs the ``tensorboard`` package
            (``pip install "juap[tensorboard]"``).
        title: the title of ``curves.png``.

    Raises:
        ConfigError: ``tensorboard=True`` without the ``tensorboard`` package.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, title: str = "") -> None:
        self.dir = Path(run_dir)
        self.rows: List[Dict[str, Any]] = []
        self.title = title
        self._tb = None
        self._tb_wanted = bool(tensorboard)
        self._unwritten = 0
        if self._tb_wanted:
            try:
                import tensorboard  # noqa: F401  (SummaryWriter needs it)
            except ImportError:
                raise ConfigError(
                    "log.tensorboard=true needs the tensorboard package: pip install 'juap[tensorboard]' "
                    "(or pip install tensorboard), or leave log.tensorboard false"
                ) from None

    # -- called by the loop engine ---------------------------------------------------------------------
    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """On resume: the rows of the history so far (from the checkpoint) replace what is on disk."""
        self.rows = [flatten(r) for r in rows]
        self._write_csv()
        if self._tb_wanted:  # events after the resumed step are dropped (a rerun of steps would double them)
            last = max((_step(r) for r in self.rows), default=0)
            self._writer(purge_step=last + 1)

    def __call__(self, row: Mapping[str, Any], images: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        flat = flatten(row)
        self.rows.append(flat)
        self._unwritten += 1
        validation = any(k.startswith("val") for k in flat)
        if validation or self._unwritten >= _WRITE_EVERY:
            self._write_csv()
        if self._tb_wanted:
            tb, step = self._writer(), _step(flat)
            for k, v in flat.items():
                if _scalar(v) and k not in _STEP_KEYS and math.isfinite(v):
                    tb.add_scalar(_tag(k), v, step)
            for name, img in (images or {}).items():
                tb.add_image(name, amplify(img.detach().float().cpu()), step)

    def flush(self) -> None:
        """Bring ``history.csv`` (and the TensorBoard events) up to date; the loop engine calls it when
        the loop ends, also when it is stopped by a signal."""
        self._write_csv()
        if self._tb is not None:
            self._tb.flush()

    # -- called by the command when the loop is over ---------------------------------------------------
    def finish(self, *, selected: Optional[int] = None, hinge: Optional[float] = None) -> None:
        """Write ``history.csv`` and ``curves.png`` (marking the ``selected`` step and the ``hinge`` level
        of the fooling loss), and close the TensorBoard events."""
        self._write_csv()
        if self.rows:
            plot_curves(self.dir / CURVES_NAME, self.rows, selected=selected, hinge=hinge, title=self.title)
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # -- files -----------------------------------------------------------------------------------------
    def _write_csv(self) -> None:
        self._unwritten = 0
        if not self.rows:
            return
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        write_text(self.dir / HISTORY_NAME, buf.getvalue())  # atomic: never half a file

    def _writer(self, purge_step: Optional[int] = None):
        if self._tb is None:
            self._tb = SummaryWriter(str(self.dir / TENSORBOARD_DIR), purge_step=purge_step)
        return self._tb


def _is_ratio(key: str) -> bool:
    return key in _RATIOS or key.endswith("_fooling_ratio") or key == "val_pointing_top20"


def _step(row: Mapping[str, Any]) -> int:
    return int(next((row[k] for k in _STEP_KEYS if k in row), 0))


def _tag(key: str) -> str:
    """TensorBoard groups by the part before the slash: ``val/fooling_ratio``, ``train/loss``."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def plot_curves(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    selected: Optional[int] = None,
    hinge: Optional[float] = None,
    title: str = "",
) -> None:
    """Loss parts, ratios (train and validation) and lambda/lr against the step, one panel each.

    ``hinge`` draws the delta of eq 16 on the loss panel (the fooling loss stops pulling below it);
    ``selected`` marks the step whose perturbation was kept.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = next((k for k in _STEP_KEYS if any(k in r for r in rows)), None)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != xkey]
    numeric = [k for k in keys if any(_scalar(r.get(k)) for r in rows)]
    ratios = [k for k in numeric if _is_ratio(k)]
    rates = [k for k in numeric if k in _RATES]
    losses = [
        k
        for k in numeric
        if k not in ratios and k not in rates and not k.startswith("val") and k != "updates"
    ]
    panels = [(p, ks) for p, ks in (("loss", losses), ("ratio", ratios), ("lambda / lr", rates)) if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, ks) in zip(axes[0], panels, strict=True):
        for k in ks:
            pts = [(r[xkey], r[k]) for r in rows if _scalar(r.get(k)) and xkey in r]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            sparse = len(pts) < 0.2 * len(rows) or len(pts) < 12  # validations: markers
            ax.plot(xs, ys, "o-" if sparse else "-", ms=3, lw=1.2 if sparse else 0.9, label=k)
        if name == "loss" and hinge is not None:
            ax.axhline(hinge, color="grey", ls=":", lw=1, label=f"hinge delta = {hinge:g}")
        if name == "ratio":
            ax.set_ylim(-0.02, 1.02)
        if name == "lambda / lr" and all(min(r[k] for r in rows if _scalar(r.get(k))) > 0 for k in ks):
            ax.set_yscale("log")
        if selected is not None:
            ax.axvline(selected, color="tab:red", ls="--", lw=1, label=f"selected {xkey} {selected}")
        ax.set_xlabel(xkey or "step")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110, title=title)
