"""A cheaper copy of a classifier for an attack's gradients: eval-mode BatchNorms folded into convolutions.

Attacks that only differentiate a frozen, eval-mode classifier w.r.t. its input (UAP's DeepFool, PGD)
spend most of their time in the backward pass, where a BatchNorm after a convolution costs a separate
kernel and a copy. Folding it into the convolution's weights (``fuse_conv_bn_eval``) gives the same
function up to float rounding; on a CPU the copy is also stored channels-last (oneDNN's faster layout).
The copy is checked against the classifier before use, and the classifier itself is never changed.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def folded_copy(classifier: nn.Module, x: torch.Tensor, *, rtol: float = 1e-4) -> nn.Module:
    """A frozen eval-mode copy of ``classifier`` with every BatchNorm2d that directly follows a Conv2d
    folded into it (and channels-last weights on a CPU): the same logits up to float rounding, cheaper
    to differentiate. Pairs are found by running ``x`` once (a BatchNorm whose input *is* a convolution's
    output); the copy's logits on ``x`` are compared with the classifier's, and the classifier itself is
    returned if they differ by more than ``rtol`` of their scale (e.g. a convolution output also used
    elsewhere) or if the classifier is in training mode.
    """
    if classifier.training:
        return classifier
    twin = copy.deepcopy(classifier).eval()
    conv_out: dict = {}
    bn_in: dict = {}
    hooks = []
    for name, m in twin.named_modules():
        if type(m) is nn.Conv2d:
            hooks.append(
                m.register_forward_hook(lambda _m, _a, out, name=name: conv_out.__setitem__(name, out))
            )
        elif type(m) is nn.BatchNorm2d and m.track_running_stats:
            hooks.append(m.register_forward_hook(lambda _m, a, _o, name=name: bn_in.__setitem__(name, a[0])))
    try:
        with torch.no_grad():
            reference = classifier(x)
            twin(x)
    finally:
        for h in hooks:
            h.remove()
    by_output = {id(out): name for name, out in conv_out.items()}
    for bn_name, inp in bn_in.items():
        conv_name = by_output.get(id(inp))
        if conv_name is None:
            continue
        _set_submodule(
            twin, conv_name, fuse_conv_bn_eval(twin.get_submodule(conv_name), twin.get_submodule(bn_name))
        )
        _set_submodule(twin, bn_name, nn.Identity())
    conv_out.clear()
    bn_in.clear()
    if x.device.type == "cpu":
        twin = twin.to(memory_format=torch.channels_last)
    for p in twin.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        gap = (twin(x) - reference).abs().max()
    return twin if bool(gap <= rtol * reference.abs().max().clamp_min(1.0)) else classifier


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class FoldedCache:
    """Keeps one :func:`folded_copy` per classifier state: rebuilt when the classifier's parameters or
    buffers change (another object, device, or an in-place update, seen through their version counters)
    or when it is put in training mode."""

    def __init__(self) -> None:
        self._key: Optional[Tuple] = None
        self._net: Optional[nn.Module] = None

    def get(self, classifier: nn.Module, x: torch.Tensor) -> nn.Module:
        """The folded copy of ``classifier`` (built and checked on ``x`` when needed)."""
        tensors = list(classifier.parameters()) + list(classifier.buffers())
        key = (id(classifier), classifier.training, x.device) + tuple(
            (t.data_ptr(), t._version) for t in tensors
        )
        if key != self._key:
            self._net, self._key = folded_copy(classifier, x), key
        return self._net
