"""Perturbation files: saved with their budget, loaded with checks."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .._registry import GENERATORS
from ..budget import check_finite, perturbation_norm, project, quantize_8bit, within_budget
from ..errors import CheckpointError, JuapError
from ..runtime import distributed
from ..runtime.io import atomic_path, load_tensors, read_metadata, save_tensors
from ..runtime.provenance import classifier_record, juap_version

PNG_OFFSET = 128  # the 8-bit PNG stores round(255 * n) + 128: mid-grey is no perturbation
PNG_FORMAT = "juap.perturbation.png"


def save_perturbation(
    stem: Path,
    n_hat: torch.Tensor,
    *,
    attack: str,
    norm: str,
    eps: float,
    provenance: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write ``<stem>.safetensors`` (key ``perturbation``, (3, H, W), [0, 1] units), ``<stem>.png`` (the
    perturbation in 8 bits, exactly as it can be added to an 8-bit image) and ``<stem>_amplified.png``.

    ``<stem>.png`` holds :func:`~juap.budget.quantize_8bit`'s perturbation as ``round(255 * n) + 128``
    per value (mid-grey: no change), with the metadata in a PNG text chunk; :func:`load_perturbation`
    reads it back to the exact 8-bit values. A perturbation with a value beyond +-127 steps (only under
    a large L2 or L_inf budget) does not fit: its PNG is a clipped picture marked as not exact, and only
    the safetensors file holds it. ``<stem>_amplified.png`` is the same amplified to the full range, as
    the UAP papers show it (:func:`amplify`). Both files carry the metadata: the budget (0-255 units, the
    measured norm), the attack, and ``provenance`` (:func:`perturbation_provenance`: the classifier's name,
    weight fingerprint, normalisation, the input size, the attack's parameters, the seed, juap's version,
    the measured metrics).

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
        "juap_version": juap_version(),
        **dict(provenance or {}),
    }
    steps = torch.round(quantize_8bit(n_hat, norm=norm, eps=eps).double() * 255)
    exact = bool(steps.abs().max() < PNG_OFFSET)
    png_meta = {**meta, "format": PNG_FORMAT, "exact": exact, "encoding": "uint8 = round(255 * n) + 128",
                "measured_norm_8bit": float(perturbation_norm(steps / 255, norm))}  # fmt: skip
    save_tensors(stem.with_suffix(".safetensors"), {"perturbation": n_hat}, meta)
    info = PngInfo()
    info.add_text("juap", json.dumps(png_meta))
    coded = (steps + PNG_OFFSET).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_path(stem.with_suffix(".png")) as tmp:
        Image.fromarray(coded).save(tmp, format="PNG", pnginfo=info)
    arr = (amplify(n_hat).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    with atomic_path(stem.with_name(stem.name + "_amplified.png")) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)


def perturbation_provenance(
    classifier,
    *,
    params: Optional[Mapping[str, Any]] = None,
    seed: Optional[int] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    input_size: Optional[Tuple[int, int]] = None,
) -> Dict[str, Any]:
    """What a perturbation file records of where it comes from: the classifier (name, classes, weight
    fingerprint) and its normalisation, the input size, the attack's parameters, the seed, the metrics."""
    out: Dict[str, Any] = {
        **classifier_record(classifier),
        "normalization": {
            "mean": [round(float(v), 6) for v in classifier.mean.flatten()],
            "std": [round(float(v), 6) for v in classifier.std.flatten()],
        },
    }
    if input_size is not None:
        out["input_size"] = [int(v) for v in input_size]
    if params is not None:
        out["params"] = {k: v for k, v in params.items() if _jsonable(v)}
    if seed is not None:
        out["seed"] = int(seed)
    if metrics is not None:
        out["metrics"] = dict(metrics)
    return out


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def amplify(n_hat: torch.Tensor) -> torch.Tensor:
    """A perturbation (3, H, W) scaled to the full range symmetrically around 0.5: ``0.5 + 0.5 * n / max|n|``.

    Zero stays mid-grey and the sign of every value is kept (brighter: added, darker: removed); the
    largest absolute value over all channels reaches 0 or 1. A zero perturbation stays grey.
    """
    return n_hat / n_hat.abs().max().clamp_min(1e-12) * 0.5 + 0.5


def load_perturbation(path: str | os.PathLike) -> torch.Tensor:
    """Read a perturbation file: ``.safetensors`` (a (3, H, W) tensor in [0, 1] pixel units) or the exact
    8-bit ``.png`` that :func:`save_perturbation` writes beside it (``(pixel - 128) / 255``)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        meta = read_perturbation_metadata(path)
        if not meta.get("exact", False):
            raise CheckpointError(
                f"{path} is a clipped picture of a perturbation with values beyond +-127 steps, not the "
                "perturbation: load the .safetensors file saved beside it"
            )
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.int16)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        return torch.from_numpy((arr - PNG_OFFSET).astype(np.float64) / 255).permute(2, 0, 1).float()
    tensors, _ = load_tensors(path)
    if "perturbation" not in tensors:
        raise CheckpointError(f"{path} holds no 'perturbation' tensor (keys: {sorted(tensors)})")
    n = tensors["perturbation"]
    if n.dim() != 3 or n.shape[0] != 3:
        raise CheckpointError(f"{path}: the perturbation must have shape (3, H, W), got {tuple(n.shape)}")
    check_finite(n, f"the perturbation in {path}")
    return n.float()


def resize_perturbation(
    n_hat: torch.Tensor, size: Tuple[int, int], *, norm: Optional[str], eps: Optional[float]
) -> torch.Tensor:
    """A perturbation resized to ``size`` (bilinear, as an image would be), then projected into its budget
    again (``norm`` None: no budget recorded, none enforced)."""
    out = F.interpolate(n_hat[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return out if norm is None or eps is None else project(out, norm=norm, eps=eps)


def check_made_for(meta: Mapping[str, Any], classifier, path: str | os.PathLike) -> None:
    """Warn when a perturbation file was made for a classifier with other weights than ``classifier``
    (both named); a file that records no classifier passes silently."""
    made = meta.get("classifier_fingerprint")
    if made is None:
        return
    own = classifier_record(classifier)
    if made != own["classifier_fingerprint"]:
        warnings.warn(
            f"{path} was made for classifier {meta.get('classifier_arch')!r} (weights {made}); it is applied "
            f"to {own['classifier_arch']!r} (weights {own['classifier_fingerprint']}): its figures measure "
            "a transfer, not the attack on the model it was learned on",
            stacklevel=2,
        )


def read_perturbation_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The metadata of a perturbation file, ``.safetensors`` or juap's 8-bit ``.png``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        return read_metadata(path)
    if not path.is_file():
        raise CheckpointError(f"perturbation file {str(path)!r} does not exist (check the path)")
    try:
        with Image.open(path) as img:
            text = img.info.get("juap") if hasattr(img, "info") else None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        meta = json.loads(text) if text else {}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != PNG_FORMAT:
        raise CheckpointError(
            f"{path} is not a juap perturbation PNG (no juap metadata): a picture cannot say which values "
            "were added; pass the perturbation.safetensors or perturbation.png that juap wrote"
        )
    return meta


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
