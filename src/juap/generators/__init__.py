"""Perturbation generators (section IV-B2): noise (N, C, H, W) -> perturbation in [-1, 1], same size.

Registered names: ``"resnet"`` (:class:`ResNetGenerator`) and ``"unet"`` (:class:`UNetGenerator`);
build one with ``juap.create_generator(name, **kwargs)``. Scale the output with eq 6
(:func:`juap.budget.scale_to_budget`) before adding it to images.
"""
from .resnet import NORMS, ImageGenerator, ResidualBlock, ResNetGenerator, norm_layer
from .unet import UNetGenerator

__all__ = ["NORMS", "ImageGenerator", "ResNetGenerator", "ResidualBlock", "UNetGenerator", "norm_layer"]
