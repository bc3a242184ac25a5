"""Attacks: JUAP and JAP (the paper's), and the baselines UAP, GUAP, GUAP-C_t, PGD and SGD-UAP."""

from .base import Attack, PerImageAttack, UniversalAttack
from .jap import JAP
from .juap import GUAP, JUAP, GeneratorUAP, GUAPTargeted
from .pgd import PGD
from .sgd_uap import SGDUAP
from .uap import UAP

__all__ = [
    "GUAP",
    "PGD",
    "SGDUAP",
    "UAP",
    "JAP",
    "JUAP",
    "Attack",
    "GUAPTargeted",
    "GeneratorUAP",
    "PerImageAttack",
    "UniversalAttack",
]
