"""The three layers, enforced: every ``juap`` import in ``src/`` points down or sideways, never up.

- foundation: ``juap.runtime`` (loop engine, checkpoints, files, configs, torchrun), ``juap.errors``,
  ``juap._validate``, ``juap._registry``; imports nothing else of juap;
- core: attacks, interpreters, classifiers, generators, data, losses, metrics, budget, evaluation,
  detection, detectors, transforms, faithfulness; imports the foundation and itself;
- application: ``juap.app`` (run folders, artifacts, reports, logs), ``juap.commands`` and ``juap.__main__``;
  imports anything. The package itself (``juap/__init__.py``, the public API) may import the core and the
  foundation.

Inside the core, the packages have floors of their own (:data:`CORE_FLOORS`: the budget, generators,
metrics and classifiers at the bottom, the attacks at the top; classifier training sits above the data
and evaluation it uses), and no two modules import each other,
directly or round a longer circle.

Imports inside functions and under ``if TYPE_CHECKING:`` count too (a lazy import, or one for the
annotations only, is still an arrow). timm keeps ``timm/layers`` from importing ``timm/models`` with the
same kind of walk.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

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
        "detectors",
        "transforms",
        "faithfulness",
    )
)
APPLICATION = ("juap.app", "juap.commands", "juap.__main__")
RANK = {"foundation": 0, "core": 1, "api": 2, "application": 3}
CORE_FLOORS = {  # inside the core: a module imports only modules of its own floor and lower floors
    "juap.budget": 0,
    "juap.generators": 0,
    "juap.transforms": 0,  # JPEG, resize, crop, blur: torch and torchvision only
    "juap.faithfulness": 0,  # deletion / insertion curves: any classifier module, torch and torchvision only
    "juap.metrics": 0,  # eqs 18-20 and the map normalisation every floor above compares maps with
    "juap.classifiers": 0,
    "juap.data": 1,
    "juap.interpreters": 2,
    "juap.losses": 3,
    "juap.evaluation": 3,
    "juap.detection": 3,
    "juap.detectors": 3,  # differentiable detectors: read maps (interpreters) and metrics
    "juap.attacks": 4,
    # a module placed apart from its package (the most specific name counts)
    "juap.classifiers.training": 3,  # trains a classifier on data sets, measuring its accuracy (evaluation)
}


def layer(module: str) -> str:
    """The layer of a dotted module name (``juap`` alone is the public API)."""
    if module == "juap":
        return "api"
    for name, prefixes in (("foundation", FOUNDATION), ("core", CORE), ("application", APPLICATION)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def core_floor(module: str) -> int:
    """The floor of a core module: that of the most specific name in :data:`CORE_FLOORS` it falls under."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in CORE_FLOORS:
            return CORE_FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no floor in the core: add it to CORE_FLOORS in tests/test_layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str, List[str]]]:
    """``(line, imported juap module, names taken from it)`` for every import in ``source`` (relative ones
    resolved; ``names`` is empty for ``import juap.x``)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "juap")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "juap":
                yield node.lineno, target, [a.name for a in node.names]


def imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str]]:
    """``(line, imported juap module)`` for every import in ``source`` (relative ones resolved)."""
    for line, target, names in imported_names(source, module, is_package):
        if target == "juap" and names:  # `from juap import x` or `from .. import x`: x may be a module
            yield from ((line, f"juap.{n}") for n in names)
        else:
            yield line, target


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
        elif mine == theirs == "core":
            here, there = core_floor(module), core_floor(target)
            if there > here:
                bad.append(f"{module}:{line} (core) imports {target} (core, floor {here} < {there})")
    return bad


def import_graph() -> Dict[str, Set[str]]:
    """Every module of ``src/juap`` and the modules it imports (a name imported from a package that is a
    module of its own counts as that module; ``juap.data`` alone is the package's ``__init__``)."""
    paths = {module_name(p): p for p in sorted((SRC / "juap").rglob("*.py"))}

    def owner(target: str) -> str:
        while target and target not in paths:
            target = target.rpartition(".")[0]
        return target

    graph: Dict[str, Set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        for _, target, names in imported_names(path.read_text(), module, path.name == "__init__.py"):
            for t in [f"{target}.{n}" if f"{target}.{n}" in paths else target for n in names] or [target]:
                if owner(t) not in ("", module):
                    graph[module].add(owner(t))
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_points_to_a_higher_layer() -> None:
    bad = []
    for path in sorted((SRC / "juap").rglob("*.py")):
        bad += forbidden(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_no_two_modules_import_each_other() -> None:
    found = circles(import_graph())
    assert not found, "circles of imports (break each by moving what both need below them):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_circle_walk_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"]]


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
        # round three: annotations count, and the core's floors
        ("juap.losses", "if TYPE_CHECKING:\n    from .commands.train_rts import RTSConfig\n", False),
        ("juap.data.base", "from ..app.runs import RunConfig", False),
        ("juap.metrics", "from .interpreters.base import normalize_maps", False),
        ("juap.evaluation", "if TYPE_CHECKING:\n    from .attacks.base import Attack\n", False),
        ("juap.classifiers.base", "def f():\n    from ..interpreters import cam\n", False),
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
