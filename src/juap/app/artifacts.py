"""Perturbation files: saved with their budget, loaded with checks."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .._registry import GENERATORS
from ..budget import check_finite, perturbation_norm, within_budget
from ..errors import CheckpointError, JuapError
from ..runtime import distributed
from ..runtime.io import atomic_path, load_tensors, save_tensors


def save_perturbation(stem: Path, n_hat: torch.Tensor, *, attack: str, norm: str, eps: float) -> None:
    """Write ``<stem>.safetensors`` (key ``perturbation``, (3, H, W), [0, 1] units) and two pictures.

    ``<stem>.png`` is the raw perturbation, ``0.5 + n_hat``: what is added to an image, around mid-grey at
    its true scale (a small budget looks nearly flat). ``<stem>_amplified.png`` is the same amplified to
    the full range, as the UAP papers show it: :func:`amplify`, symmetric around 0.5 (0 stays grey, the
    largest ``|n_hat|`` of any channel reaches 0 or 1, signs and the ratios between channels kept).

    Under torchrun only rank 0 writes.
    """
    if not distributed.is_main():
        return

    stem = Path(stem)
    n_hat = n_hat.detach().cpu().float()
    check_finite(n_hat, f"the {attack} perturbation")
    measured = float(perturbation_norm(n_hat.double(), norm))
    if not within_budget(measured, eps):  # never write a budget the perturbation exceeds
        raise JuapError(
            f"the {attack} perturbation measures {measured:.6g} in {norm}, above its budget eps={eps:g}: "
            f"not saved to {stem}.safetensors (a projection bug; please report it)"
        )
    meta = {
        "format": "juap.perturbation",
        "attack": attack,
        "norm": norm,
        "eps": eps,
        "shape": list(n_hat.shape),
        "measured_norm": measured,
    }
    save_tensors(stem.with_suffix(".safetensors"), {"perturbation": n_hat}, meta)
    for path, picture in (
        (stem.with_suffix(".png"), n_hat + 0.5),
        (stem.with_name(stem.name + "_amplified.png"), amplify(n_hat)),
    ):
        arr = (picture.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")


def amplify(n_hat: torch.Tensor) -> torch.Tensor:
    """A perturbation (3, H, W) scaled to the full range symmetrically around 0.5: ``0.5 + 0.5 * n / max|n|``.

    Zero stays mid-grey and the sign of every value is kept (brighter: added, darker: removed); the
    largest absolute value over all channels reaches 0 or 1. A zero perturbation stays grey.
    """
    return n_hat / n_hat.abs().max().clamp_min(1e-12) * 0.5 + 0.5


def load_perturbation(path: str | os.PathLike) -> torch.Tensor:
    """Read ``perturbation.safetensors`` (a (3, H, W) tensor in [0, 1] pixel units)."""

    tensors, _ = load_tensors(path)
    if "perturbation" not in tensors:
        raise CheckpointError(f"{path} holds no 'perturbation' tensor (keys: {sorted(tensors)})")
    n = tensors["perturbation"]
    if n.dim() != 3 or n.shape[0] != 3:
        raise CheckpointError(f"{path}: the perturbation must have shape (3, H, W), got {tuple(n.shape)}")
    check_finite(n, f"the perturbation in {path}")
    return n.float()


def load_generator(path: str | os.PathLike) -> tuple[torch.nn.Module, torch.Tensor]:
    """Read a trained generator as a generator attack saves it (``generator_artifact``: ``generator.*``
    weights, the fixed input ``noise``, metadata naming the architecture).

    Returns:
        (the generator in eval mode, its fixed input noise (1, C, H, W)).
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != "juap.generator" or "noise" not in tensors:
        raise CheckpointError(f"{path} is not a juap generator file (no 'juap.generator' format or no noise)")
    spec = meta.get("generator")
    if spec not in GENERATORS:
        raise CheckpointError(
            f"{path}: its generator {spec!r} is not a registered name ({', '.join(GENERATORS.names())}); a "
            "generator passed as a module cannot be rebuilt from the file"
        )
    generator = GENERATORS.create(spec, **(meta.get("generator_options") or {}))
    state = {k[len("generator.") :]: v for k, v in tensors.items() if k.startswith("generator.")}
    try:
        generator.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit a {spec!r} generator: {e}") from None
    return generator.eval(), tensors["noise"]
