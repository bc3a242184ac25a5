"""The three layers, enforced: every ``juap`` import in ``src/`` points down or sideways, never up.

- foundation: ``juap.runtime`` (loop engine, checkpoints, files, configs, torchrun), ``juap.errors``,
  ``juap._validate``, ``juap._registry``; imports nothing else of juap;
- core: attacks, interpreters, classifiers, generators, data, losses, metrics, budget, evaluation,
  detection; imports the foundation and itself;
- application: ``juap.app`` (run folders, artifacts, reports, logs), ``juap.commands`` and ``juap.__main__``;
  imports anything. The package itself (``juap/__init__.py``, the public API) may import the core and the
  foundation.

Imports inside functions count too (a lazy import is still an arrow). timm keeps ``timm/layers`` from
importing ``timm/models`` with the same kind of walk.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

FOUNDATION = ("juap.runtime", "juap.errors", "juap._validate", "juap._registry")
CORE = tuple(
    f"juap.{m}"
    for m in (
        "attacks",
        "interpreters",
        "classifiers",
        "generators",
        "data",
        "losses",
        "metrics",
        "budget",
        "evaluation",
        "detection",
    )
)
APPLICATION = ("juap.app", "juap.commands", "juap.__main__")
RANK = {"foundation": 0, "core": 1, "api": 2, "application": 3}


def layer(module: str) -> str:
    """The layer of a dotted module name (``juap`` alone is the public API)."""
    if module == "juap":
        return "api"
    for name, prefixes in (("foundation", FOUNDATION), ("core", CORE), ("application", APPLICATION)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str]]:
    """``(line, imported juap module)`` for every import in ``source`` (relative ones resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "juap")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "juap":
                continue
            if target == "juap":  # `from juap import x`, or `from .. import x` at the top: x may be a module
                yield from ((node.lineno, f"juap.{a.name}") for a in node.names)
            else:
                yield node.lineno, target


def forbidden(source: str, module: str, is_package: bool = False) -> List[str]:
    """The imports of ``source`` (the text of ``module``) that point to a higher layer."""
    mine = layer(module)
    bad = []
    for line, target in imports(source, module, is_package):
        try:
            theirs = layer(target)
        except AssertionError:  # `from juap import create_attack`: a name of the public API
            theirs = "api"
        if RANK[theirs] > RANK[mine]:
            bad.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    return bad


def test_no_import_points_to_a_higher_layer() -> None:
    bad = []
    for path in sorted((SRC / "juap").rglob("*.py")):
        bad += forbidden(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    for path in (SRC / "juap").rglob("*.py"):
        layer(module_name(path))  # raises for a new top-level module nobody placed


@pytest.mark.parametrize(
    "module, source, is_package",
    [  # the arrows found in the structural read of issue 22, written as they were
        ("juap.data", "from ..commands.configs import DataConfig", True),
        ("juap.interpreters.sanity", "from ..commands.train_rts import _test_boxes, pointing_game", False),
        ("juap.runtime.loop", "from ..data import InMemoryLoader", False),
        ("juap.runtime.report", "from ..interpreters.base import normalize_maps", False),
        ("juap.runtime.artifacts", "from ..evaluation import check_finite, within_budget", False),
        ("juap.attacks.juap", "from ..app.history import RunLog", False),
        ("juap.metrics", "def f():\n    from juap.commands.run import plan\n", False),
        ("juap.losses", "import juap.app.report", False),
        ("juap.budget", "from . import commands", False),
        ("juap.runtime.io", "from juap import create_attack", False),
    ],
)
def test_the_walk_catches_an_upward_arrow(module: str, source: str, is_package: bool) -> None:
    assert forbidden(source, module, is_package), f"{source!r} in {module} should be refused"


@pytest.mark.parametrize(
    "module, source",
    [
        ("juap.attacks.juap", "from ..runtime.loop import TrainLoop"),
        ("juap.commands.attack", "from ..attacks.base import UniversalAttack"),
        ("juap.app.report", "from ..interpreters.base import normalize_maps"),
        ("juap.runtime.loop", "from .checkpoint import cpu_copy"),
    ],
)
def test_the_walk_allows_downward_and_sideways_arrows(module: str, source: str) -> None:
    assert forbidden(source, module) == []
