"""`juap evaluate`: measure a saved perturbation on a data split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from ..app.artifacts import check_made_for, load_perturbation, read_perturbation_metadata, resize_perturbation
from ..data import (
    CountSkipped,
    data_summary,
    make_loader,
)
from ..errors import ConfigError
from ..evaluation import perturbation_budget
from ..runtime.distributed import resolve_device
from .attack import measure_and_write
from .build import attack_data, build_classifier, check_classes, eval_interpreters


def run_evaluate(
    cfg,
    perturbation: str,
    run_dir: Path,
    *,
    progress: bool = True,
    budget_given: bool = False,
    resize: bool = False,
) -> Dict[str, Any]:
    """``juap evaluate``: measure a saved perturbation on the test split with every interpreter.

    ``perturbation``: a ``perturbation.safetensors`` or the exact 8-bit ``perturbation.png`` juap writes
    beside it. The budget in metrics.json is the one the file records (a config budget that differs is an
    error); ``budget_given`` says the config set ``attack.eps``/``attack.norm`` (for files that record
    none). A perturbation of another size than the data's is an error, or with ``resize`` resized
    (bilinear) and projected into its budget again. A file made for a classifier with other weights than
    this one gives a warning that names both. Like ``juap attack`` it writes ``transitions.csv`` and
    ``maps.png`` beside ``metrics.json``, and the figures as applied in 8 bits (``as_8bit``).
    """

    torch.manual_seed(cfg.seed)  # a classifier without weights is the same random one on every rank
    device = resolve_device(cfg.device)
    n_hat = load_perturbation(perturbation)
    meta = read_perturbation_metadata(perturbation)
    given = {"norm": cfg.attack.norm, "eps": cfg.attack.eps} if budget_given else None
    budget = perturbation_budget(n_hat, file_budget=meta, config_budget=given, source=str(perturbation))
    splits, _, _, test = attack_data(cfg, progress=progress)
    size = cfg.data.image_size
    resized_from = None
    if tuple(n_hat.shape[1:]) != (size, size):
        resized_from = list(n_hat.shape[1:])
        if not resize:
            raise ConfigError(
                f"the perturbation is {n_hat.shape[1]}x{n_hat.shape[2]} but the data is resized to "
                f"{size}x{size}: set data.image_size={n_hat.shape[1]}, use a perturbation made for this "
                "size, or pass --resize to resize it (bilinear, then projected into its budget)"
            )
        n_hat = resize_perturbation(n_hat, (size, size), norm=budget["norm"], eps=budget["eps"])
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device)
    check_classes(clf, splits)
    check_made_for(meta, clf, perturbation)
    interps = {n: i.to(device) for n, i in eval_interpreters(cfg, clf).items()}
    test_loader = CountSkipped(make_loader(test, batch_size=cfg.evaluate.batch_size))
    made_by = {k: meta.get(k) for k in ("attack", "generator", "objective")}  # the file's, not the config's
    return measure_and_write(
        run_dir,
        cfg,
        clf,
        interps,
        n_hat,
        test_loader,
        class_names=splits.classes,
        device=device,
        progress=progress,
        extra={"perturbation_file": str(perturbation), "resized_from": resized_from},
        after={**made_by, **budget, "data_summary": data_summary(splits, test=test)},
    )
