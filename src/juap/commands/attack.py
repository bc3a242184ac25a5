"""`juap attack`: fit one attack, save its perturbation or generator, evaluate it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..data import (
    CountSkipped,
    data_summary,
    make_loader,
    save_split,
)
from ..runtime import distributed
from ..runtime.artifacts import save_perturbation
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.runs import finish_run
from ._build import (
    _check_classes,
    attack_data,
    build_attack,
    build_classifier,
    build_interpreter,
    eval_interpreters,
)
from .configs import (
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    EvalConfig,
    InterpreterConfig,
    attack_split_data,
)


@dataclasses.dataclass(frozen=True)
class AttackRunConfig:
    """``juap attack`` and ``juap evaluate``."""

    data: DataConfig = dataclasses.field(default_factory=attack_split_data)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    interpreter: InterpreterConfig = dataclasses.field(default_factory=InterpreterConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"


def run_attack(
    cfg, run_dir: Path, *, progress: bool = True, resume: bool = False, checkpoint_every: Optional[int] = None
) -> Dict[str, Any]:
    """``juap attack``: fit on the train split, evaluate on the test split, save the artifacts.

    An attack whose ``fit`` checkpoints (JUAP, GUAP) writes ``checkpoint.safetensors`` into ``run_dir``
    every ``checkpoint_every`` steps (default: its ``eval_every``); ``resume`` continues from it.
    """
    from ..attacks.base import UniversalAttack
    from ..evaluation import evaluate

    torch.manual_seed(cfg.seed)  # the same on every rank: models built below agree (random weights too)
    device = resolve_device(cfg.device)
    splits, train, val, test = attack_data(cfg, progress=progress)
    if distributed.is_main():  # under torchrun only rank 0 writes files
        save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device)
    _check_classes(clf, splits)
    interp = build_interpreter(
        cfg.interpreter.name, clf, checkpoint=cfg.interpreter.checkpoint, options=cfg.interpreter.options
    )
    interp = interp.to(device) if interp is not None else None
    attack = build_attack(cfg.attack, clf, interp, device=device)
    if distributed.world_size() > 1:  # per-rank RNG from here (per-image random starts differ by rank)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    batch = getattr(attack, "batch_size", 30)
    t0 = time.perf_counter()
    fit_info: Dict[str, Any] = {}
    if isinstance(attack, UniversalAttack):
        drop_last = (
            getattr(attack, "generator_spec", None) is not None and len(train) > batch
        )  # fixed-size steps
        train_loader = make_loader(train, batch_size=batch, shuffle=True, seed=cfg.seed, drop_last=drop_last)
        val_loader = make_loader(val, batch_size=batch) if val is not None else None
        fit_kwargs = {"val_data": val_loader} if "val_data" in _fit_params(attack) else {}
        if "checkpoint_dir" in _fit_params(attack):
            fit_kwargs.update(checkpoint_dir=run_dir, checkpoint_every=checkpoint_every, resume=resume)
        n_hat = attack.fit(train_loader, progress=progress, **fit_kwargs)
        save_perturbation(
            run_dir / "perturbation", n_hat, attack=cfg.attack.name, norm=cfg.attack.norm, eps=cfg.attack.eps
        )
        if getattr(attack, "generator", None) is not None and distributed.is_main():
            from ..runtime.io import save_tensors

            save_tensors(
                run_dir / "generator.safetensors",
                {
                    **{f"generator.{k}": v for k, v in attack.generator.state_dict().items()},
                    "noise": attack.noise,
                },
                {
                    "format": "juap.generator",
                    "generator": str(attack.generator_spec),
                    "generator_options": attack.generator_options,
                    "norm": cfg.attack.norm,
                    "eps": cfg.attack.eps,
                },
            )
        fit_info = {
            "best_step": getattr(attack, "best_step", None),
            "validation": getattr(attack, "best_val", None),
        }
    fit_seconds = time.perf_counter() - t0
    interps = {n: i.to(device) for n, i in eval_interpreters(cfg, clf).items()}
    target = cfg.attack.params.get("target")
    test_loader = CountSkipped(make_loader(test, batch_size=cfg.evaluate.batch_size))
    ev = evaluate(
        clf, attack, test_loader, interpreters=interps, target=target, device=device, progress=progress
    )
    metrics = summarize(cfg, ev, fit_seconds=fit_seconds, **fit_info)
    metrics["data_summary"] = {
        **data_summary(splits, train=train, val=val, test=test),
        "test_skipped_images": test_loader.skipped,  # unreadable at decode time
    }
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _fit_params(attack) -> set:
    import inspect

    return set(inspect.signature(attack.fit).parameters)


def summarize(cfg, ev: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """metrics.json: the attack's identity, its budget, and the figures on the test split."""
    params = cfg.attack.params
    main = cfg.interpreter.name or (cfg.evaluate.interpreters[0] if cfg.evaluate.interpreters else None)
    out: Dict[str, Any] = {
        "attack": cfg.attack.name,
        "generator": params.get("generator", "resnet")
        if cfg.attack.name in ("juap", "guap", "guap_ct", "jap")
        else None,
        "interpreter": cfg.interpreter.name,
        "norm": cfg.attack.norm,
        "eps": cfg.attack.eps,
        "objective": params.get("objective"),
        "classifier": cfg.classifier.name,
    }
    for key in ("perturbation_linf", "perturbation_l2"):
        if key in ev:
            out[key] = ev[key]
    if "perturbation_linf" in ev:
        out["perturbation_norm"] = ev[f"perturbation_{cfg.attack.norm}"]
    for key in ("n_images", "fooling_ratio", "clean_accuracy", "adversarial_accuracy", "target_success_rate"):
        if key in ev:
            out[key] = ev[key]
    if main and main in ev["interpreters"]:
        m = ev["interpreters"][main]
        out.update(
            {
                "map_interpreter": main,
                "l1": m.get("l1"),
                "iou": m.get("iou"),
                "iou_per_k": {k.split("@")[1]: v for k, v in m.items() if k.startswith("iou@")},
                "random_iou": m.get("random_iou"),
            }
        )
    out["transfer"] = ev["interpreters"]
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
