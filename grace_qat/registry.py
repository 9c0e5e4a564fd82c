"""The one kind of registry grace_qat keeps: on-disk layouts by name, each name once, in
registration order. GRACE formats (:mod:`grace_qat.formats`) and export targets
(:mod:`grace_qat.targets`) each keep one."""
from __future__ import annotations

from .errors import GraceFormatError


class Registry:
    def __init__(self, what: str, unknown: str):
        self._items: dict = {}
        self._what, self._unknown = what, unknown   # unknown: "...{name!r}...{names}"

    def register(self, item):
        if item.name in self._items:
            raise ValueError(f"{self._what} {item.name!r} is registered twice")
        self._items[item.name] = item
        return item

    def get(self, name: str):
        try:
            return self._items[name]
        except KeyError:
            raise GraceFormatError(self._unknown.format(name=name, names=self.names())) from None

    def names(self) -> tuple[str, ...]:
        """Every name, in registration order."""
        return tuple(self._items)

    def items(self) -> list:
        return list(self._items.values())
