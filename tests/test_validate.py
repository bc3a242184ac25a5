"""juap._validate: the argument checks every module and config shares."""

from __future__ import annotations

import math

import pytest

from juap._validate import (
    FROM_SIGNATURE,
    REQUIRED,
    Param,
    check_choice,
    check_int,
    check_number,
    check_params,
    check_range,
    is_int,
    is_number,
)
from juap.errors import ConfigError


def test_bools_are_neither_ints_nor_numbers():
    assert is_int(3) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_number(3) and is_number(0.5) and not is_number(False) and not is_number(math.nan)
    assert not is_number(math.inf)
    with pytest.raises(ConfigError, match="steps must be an integer, got True"):
        check_int("steps", True)
    assert check_int("steps", 4, low=1) == 4 and check_number("lr", 1, low=0, low_open=True) == 1.0


def test_ranges_name_the_field_and_the_bounds():
    with pytest.raises(ConfigError, match=r"lr = 0 is out of range; it must be > 0"):
        check_range("lr", 0, low=0, low_open=True)
    with pytest.raises(ConfigError, match=r"p = 1.5 .* >= 0 and <= 1"):
        check_range("p", 1.5, low=0, high=1)
    with pytest.raises(ConfigError, match="out of range"):
        check_range("x", math.inf)
    check_range("x", 0, low=0)
    with pytest.raises(ConfigError, match="allowed values: a, b"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ConfigError):  # 1 == True to Python, not to a choice of bools
        check_choice("flag", 1, (True, False))


def test_param_types_ranges_choices_and_tuples():
    Param(float, 0.5, low=0).check("lam", 2)  # an int where a float is declared
    with pytest.raises(ConfigError, match="lam must be float, got True"):
        Param(float, 0.5).check("lam", True)
    Param(int, None, optional=True).check("seed", None)
    with pytest.raises(ConfigError, match="seed must be int, got None"):
        Param(int, 0).check("seed", None)
    with pytest.raises(ConfigError, match="not allowed"):
        Param(str, "a", choices=("a", "b")).check("mode", "z")
    Param((bool, str), "auto", choices=("auto", True, False)).check("surrogate", True)
    Param(tuple, (0.5, 0.9), length=2, items=float, low=0, high=1).check("betas", [0.1, 0.2])
    with pytest.raises(ConfigError, match="betas must hold 2 values"):
        Param(tuple, (0.5, 0.9), length=2).check("betas", (0.1,))
    with pytest.raises(ConfigError, match=r"betas\[1\] = 2 is out of range"):
        Param(tuple, (0.5, 0.9), items=float, low=0, high=1).check("betas", (0.1, 2))
    assert Param(int, REQUIRED).required and not Param(int, 3).required
    assert Param(int).default is FROM_SIGNATURE and Param(int).required  # until an attack fills it in


def test_an_attack_declares_each_default_once():
    """A declaration without a default takes the constructor's; one that disagrees, or that no constructor
    takes, is refused when the class is made (so the two can never drift apart)."""
    from juap.attacks.base import UniversalAttack

    class Toy(UniversalAttack):
        hyperparams = {"steps": Param(int, low=1), "mode": Param(str, choices=("a", "b")), "need": Param(int)}

        def __init__(self, *, steps: int = 7, mode: str = "b", need: int, **kw) -> None:
            super().__init__(**kw)

    assert {k: p.default for k, p in Toy.hyperparams.items()} == {"steps": 7, "mode": "b", "need": REQUIRED}

    class Narrower(Toy):  # a subclass that changes a default without declaring again gets it too
        def __init__(self, *, steps: int = 3, **kw) -> None:
            super().__init__(steps=steps, **kw)

    assert Narrower.hyperparams["steps"].default == 3 and Narrower.hyperparams["mode"].default == "b"
    with pytest.raises(TypeError, match="declared default 5, constructor default 7"):

        class Drifted(UniversalAttack):
            hyperparams = {"steps": Param(int, 5)}

            def __init__(self, *, steps: int = 7, **kw) -> None:
                super().__init__(**kw)

    with pytest.raises(TypeError, match="declares hyperparameter 'ghost' but no constructor takes it"):

        class Ghost(UniversalAttack):
            hyperparams = {"ghost": Param(int)}


def test_check_params_unknown_missing_and_bad():
    declared = {"steps": Param(int, 10, low=1), "target": Param(int, low=0)}
    check_params("attack 'x'", declared, {"steps": 3, "target": 0})
    with pytest.raises(ConfigError, match="takes no parameter 'step'. Did you mean 'steps'"):
        check_params("attack 'x'", declared, {"step": 3, "target": 0})
    with pytest.raises(ConfigError, match="attack 'x' needs target"):
        check_params("attack 'x'", declared, {"steps": 3})
    with pytest.raises(ConfigError, match=r"attack 'x'.steps = 0 is out of range"):
        check_params("attack 'x'", declared, {"steps": 0, "target": 1})
