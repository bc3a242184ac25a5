"""Attacks: JUAP and JAP (the paper's), and the baselines UAP, GUAP, GUAP-C_t and PGD."""

from .base import Attack, PerImageAttack, UniversalAttack
from .jap import JAP
from .juap import GUAP, JUAP, GeneratorUAP, GUAPTargeted
from .pgd import PGD
from .uap import UAP

__all__ = [
    "GUAP",
    "PGD",
    "UAP",
    "JAP",
    "JUAP",
    "Attack",
    "GUAPTargeted",
    "GeneratorUAP",
    "PerImageAttack",
    "UniversalAttack",
]
