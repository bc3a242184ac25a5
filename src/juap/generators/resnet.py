"""ResNet perturbation generator (Johnson et al.; CycleGAN's ``ResnetGenerator``; GUAP's generator).

Also holds the small base every generator shares: input checks and the ``norm`` option.

Layout (``ngf`` = 64, ``n_blocks`` = 6 by default)::

    reflect-pad 3, 7x7 conv C_in->ngf, norm, ReLU          # (N, ngf, H, W)
    3x3 conv stride 2 ngf->2ngf, norm, ReLU                # (N, 2ngf, H/2, W/2)
    3x3 conv stride 2 2ngf->4ngf, norm, ReLU               # (N, 4ngf, H/4, W/4)
    n_blocks x residual block (reflect-pad 3x3 conv, norm, ReLU, reflect-pad 3x3 conv, norm, + skip)
    3x3 transposed conv stride 2 4ngf->2ngf, norm, ReLU    # (N, 2ngf, H/2, W/2)
    3x3 transposed conv stride 2 2ngf->ngf, norm, ReLU     # (N, ngf, H, W)
    reflect-pad 3, 7x7 conv ngf->C_out, tanh               # (N, C_out, H, W) in [-1, 1]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .._registry import GENERATORS
from .._validate import check_int, check_number
from ..errors import ConfigError

NORMS = ("batch", "instance", "none")


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Factory ``channels -> module`` for a generator's ``norm`` option.

    ``"batch"`` is BatchNorm2d with affine parameters that always normalises with the statistics of
    the current batch, in eval mode too (``track_running_stats=False``): a universal generator sees
    one fixed noise image, and running statistics (slow to converge from their (0, 1) start) would
    make its eval-mode output differ from the perturbation it was trained to produce.
    ``"instance"`` is InstanceNorm2d without affine parameters (as in CycleGAN); ``"none"`` is the
    identity.
    """
    if norm == "batch":
        return lambda channels: nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "instance":
        return lambda channels: nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ConfigError(f"generator norm must be one of {', '.join(NORMS)}; got {norm!r}")


class ImageGenerator(nn.Module):
    """Base of the perturbation generators: noise (N, C_in, H, W) -> perturbation (N, C_out, H, W).

    Subclasses build their layers and implement :meth:`generate`; :meth:`forward` checks the input
    first, so a wrong image size fails with a message instead of a shape error deep inside a conv.
    The output is in [-1, 1] (tanh); eq 6 scaling is :func:`juap.budget.scale_to_budget`.

    Norm layers keep no running statistics, so train and eval mode give the same output (only
    U-Net dropout differs). ``norm="none"`` with the default ``init_std`` starts with a small output
    (std ~0.005): the first perturbations lie inside the budget until training grows them (eq 6
    only scales down).

    Args:
        name: the registered name, used in messages.
        in_channels: channels of the noise input.
        out_channels: channels of the perturbation.
    """

    size_multiple: int = 32  # one rule for every generator (the U-Net needs it; the ResNet needs 4)

    def __init__(self, *, name: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        check_int("generator in_channels", in_channels, low=1)
        check_int("generator out_channels", out_channels, low=1)
        self.name = name
        self.in_channels = in_channels
        self.out_channels = out_channels

    def check_input(self, n: torch.Tensor) -> None:
        """Raise :class:`ConfigError` unless ``n`` is (N, in_channels, H, W) with H, W multiples of 32."""
        if n.dim() != 4 or n.shape[1] != self.in_channels:
            raise ConfigError(
                f"generator {self.name!r} expects input of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(n.shape)}"
            )
        height, width = n.shape[-2:]
        m = self.size_multiple
        if height % m or width % m:
            raise ConfigError(
                f"generator {self.name!r} needs height and width divisible by {m}, got {height}x{width}; "
                "resize images to e.g. 64 or 224"
            )

    def generate(self, n: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W) in [-1, 1]; the input is already checked."""
        raise NotImplementedError

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        """Map noise (N, C_in, H, W) to a perturbation (N, C_out, H, W) in [-1, 1] (eq 5)."""
        self.check_input(n)
        return self.generate(n)

    def init_weights(self, std: float) -> None:
        """CycleGAN's ``normal`` init: conv weights N(0, std), norm scales N(1, std), biases 0."""
        check_number("generator init_std", std, low=0.0, low_open=True)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """x + (reflect-pad, 3x3 conv, norm, ReLU, reflect-pad, 3x3 conv, norm)(x); shape-preserving."""

    def __init__(self, channels: int, make_norm: Callable[[int], nn.Module], bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            make_norm(channels),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            make_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@GENERATORS.register("resnet")
class ResNetGenerator(ImageGenerator):
    """ResNet generator of the paper's R-JUAP (section IV-B2), as in GUAP and CycleGAN.

    A conv layer followed by a norm layer has no bias (it would be cancelled by the norm);
    with ``norm="none"`` every conv has a bias.

    Args:
        ngf: channels after the first conv; the bottleneck has ``4 * ngf``.
        n_blocks: residual blocks at 1/4 resolution.
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``.
        in_channels: channels of the noise input.
        out_channels: channels of the perturbation.
        init_std: std of the normal weight init (CycleGAN's 0.02).

    Shapes:
        (N, in_channels, H, W) -> (N, out_channels, H, W) in [-1, 1], H and W multiples of 32.

    Example:
        >>> from juap.budget import scale_to_budget
        >>> g = juap.create_generator("resnet", ngf=64, n_blocks=6)
        >>> noise = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        >>> n_hat = scale_to_budget(g(noise), norm="l2", eps=2000)  # (1, 3, 224, 224), eq 6
    """

    label = "R"  # the method's prefix in tables: R-JUAP

    def __init__(
        self,
        *,
        ngf: int = 64,
        n_blocks: int = 6,
        norm: str = "batch",
        in_channels: int = 3,
        out_channels: int = 3,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(name="resnet", in_channels=in_channels, out_channels=out_channels)
        check_int("generator ngf", ngf, low=1)
        check_int("generator n_blocks", n_blocks, low=0)
        make_norm = norm_layer(norm)
        bias = norm == "none"
        self.norm = norm

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            make_norm(ngf),
            nn.ReLU(),
        ]
        for mult in (1, 2):  # downsample: ngf -> 2ngf -> 4ngf
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                make_norm(ngf * mult * 2),
                nn.ReLU(),
            ]
        layers += [ResidualBlock(ngf * 4, make_norm, bias) for _ in range(n_blocks)]
        for mult in (4, 2):  # upsample: 4ngf -> 2ngf -> ngf
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                make_norm(ngf * mult // 2),
                nn.ReLU(),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.init_weights(init_std)

    def generate(self, n: torch.Tensor) -> torch.Tensor:
        return self.model(n)
