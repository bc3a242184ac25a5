"""One small registry for every kind of object a YAML name can resolve to."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, List, TypeVar

from .errors import JuapError

T = TypeVar("T")


class UnknownNameError(JuapError, KeyError):
    """Raised when a name is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to classes or factories, e.g. ``CLASSIFIERS.register("resnet18")(fn)`` or
    ``@INTERPRETERS.register("cam")`` on a class (whose declared capabilities ``get(name)`` then shows).

    Args:
        kind: what the registry holds ("classifier", "interpreter", ...), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., T]] = {}
        self._families: Dict[str, Callable[[str], Callable[..., T]]] = {}

    def register_family(self, prefix: str, resolve: Callable[[str], Callable[..., T]]) -> None:
        """Names ``"<prefix>:<member>"`` resolved on demand by ``resolve(member)`` (which raises an
        :class:`UnknownNameError` for a member it does not know), e.g. ``"pgc:scorecam"``: a family of
        entries built from another package, kept out of :meth:`names`."""
        if prefix in self._families:
            raise ValueError(f"{self.kind} family {prefix!r} is registered twice")
        self._families[prefix] = resolve

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        prefix, sep, member = name.partition(":") if isinstance(name, str) else ("", "", "")
        if sep and prefix in self._families:
            return self._families[prefix](member)
        families = "".join(f", {p}:<name>" for p in sorted(self._families))
        known = (", ".join(sorted(self._entries)) or "(none registered)") + families
        close = difflib.get_close_matches(name, list(self._entries), n=1) if isinstance(name, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {known}")

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build ``name``: through the entry's ``create`` classmethod when it has one (interpreters check
        their options there), else by calling the entry (a class or a factory function)."""
        entry = self.get(name)
        return getattr(entry, "create", entry)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def families(self) -> List[str]:
        """The prefixes of the registered families (``"pgc"``, ``"captum"``)."""
        return sorted(self._families)

    def __contains__(self, name: str) -> bool:
        if name in self._entries:
            return True
        try:
            return isinstance(name, str) and ":" in name and self.get(name) is not None
        except UnknownNameError:
            return False


CLASSIFIERS: Registry = Registry("classifier")
INTERPRETERS: Registry = Registry("interpreter")
GENERATORS: Registry = Registry("generator")
ATTACKS: Registry = Registry("attack")
DETECTORS: Registry = Registry("detector")  # juap.detectors: differentiable detectors
DATASETS: Registry = Registry("data set")  # juap.data.base.DataSet classes: what each data set needs
