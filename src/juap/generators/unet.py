"""U-Net perturbation generator (CycleGAN's ``UnetGenerator`` with 5 levels) of the paper's U-JUAP.

Five stride-2 4x4 convs halve the size down to H/32 (1x1 at 32x32, 7x7 at 224x224); the up path
mirrors them with stride-2 4x4 transposed convs and concatenates each level's down output (skip)::

    level  down (LeakyReLU 0.2, conv, norm)      up (ReLU, transposed conv, norm), cat skip
    1      C_in -> ngf      (no act, no norm)    2ngf  -> C_out, tanh  (no norm, no skip)
    2      ngf  -> 2ngf                          4ngf  -> ngf,  cat -> 2ngf
    3      2ngf -> 4ngf                          8ngf  -> 2ngf, cat -> 4ngf
    4      4ngf -> 8ngf                          16ngf -> 4ngf, cat -> 8ngf
    5      8ngf -> 8ngf     (innermost, no norm) 8ngf  -> 8ngf, cat -> 16ngf

The innermost down conv has no norm, as in CycleGAN, so a 1x1 map at batch 1 trains with BatchNorm.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .._registry import GENERATORS
from .._validate import check_int, check_number
from ..errors import ConfigError
from .resnet import ImageGenerator, norm_layer

N_LEVELS = 5


@GENERATORS.register("unet")
class UNetGenerator(ImageGenerator):
    """U-Net generator with 5 down levels and skip connections (section IV-B2).

    A conv followed by a norm layer has no bias; the others (innermost down, last up, or all with
    ``norm="none"``) have one.

    Args:
        ngf: channels of the first level; levels have ``ngf * (1, 2, 4, 8, 8)``.
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``.
        dropout: dropout probability after the norm of the inner up convs (levels 2-5); 0 disables it
            (default; CycleGAN uses 0.5 in its 8ngf-wide middle levels, which 5 levels do not have).
        in_channels: channels of the noise input.
        out_channels: channels of the perturbation.
        init_std: std of the normal weight init (CycleGAN's 0.02).

    Shapes:
        (N, in_channels, H, W) -> (N, out_channels, H, W) in [-1, 1], H and W multiples of 32.
    """

    label = "U"  # the method's prefix in tables: U-JUAP

    def __init__(
        self,
        *,
        ngf: int = 64,
        norm: str = "batch",
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int = 3,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(name="unet", in_channels=in_channels, out_channels=out_channels)
        check_int("generator ngf", ngf, low=1)
        if check_number("generator dropout", dropout, low=0.0) >= 1.0:
            raise ConfigError(f"generator dropout must be a probability in [0, 1), got {dropout!r}")
        make_norm = norm_layer(norm)
        bias = norm == "none"
        self.norm = norm
        widths = [ngf * m for m in (1, 2, 4, 8, 8)]  # output channels of each down level

        self.down = nn.ModuleList()
        cin = in_channels
        for level, cout in enumerate(widths, start=1):
            if level == 1:
                block = [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=bias)]
            elif level == N_LEVELS:  # innermost: no norm (a 1x1 map at 32x32)
                block = [nn.LeakyReLU(0.2), nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            else:
                conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=bias)
                block = [nn.LeakyReLU(0.2), conv, make_norm(cout)]
            self.down.append(nn.Sequential(*block))
            cin = cout

        self.up = nn.ModuleList()  # innermost first
        for level in range(N_LEVELS, 1, -1):
            cin = widths[level - 1] * (1 if level == N_LEVELS else 2)  # innermost has no skip yet
            cout = widths[level - 2]
            block = [
                nn.ReLU(),
                nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias),
                make_norm(cout),
            ]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*block))
        last = nn.ConvTranspose2d(widths[0] * 2, out_channels, 4, stride=2, padding=1)
        self.up.append(nn.Sequential(nn.ReLU(), last, nn.Tanh()))
        self.init_weights(init_std)

    def generate(self, n: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        h = n
        for down in self.down:
            h = down(h)
            skips.append(h)  # level l: (N, widths[l-1], H / 2^l, W / 2^l)
        skips.pop()  # the innermost output is h itself
        for up in self.up:
            h = up(h)
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        return h  # (N, C_out, H, W)
