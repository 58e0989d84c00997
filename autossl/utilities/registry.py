"""Things found by name (timm-style): one registry per kind, filled by ``@register("name")`` on
classes in the files of one package, which are imported the first time a name is looked up."""
from __future__ import annotations

import importlib
import pkgutil


class Registry:
    def __init__(self, kind: str, package: str, option: str):
        self.kind = kind          # "SSL method", for messages
        self.package = package    # the package whose modules hold the registered classes
        self.option = option      # how the command line names one, for messages ("--ssl method")
        self.entries: dict[str, type] = {}

    def register(self, name: str):
        def deco(cls):
            if name in self.entries and self.entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name
            self.entries[name] = cls
            return cls

        return deco

    def _import_all(self) -> None:
        pkg = importlib.import_module(self.package)
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{m.name}")

    def available(self) -> list[str]:
        self._import_all()
        return sorted(self.entries)

    def get(self, name: str) -> type:
        self._import_all()
        if name not in self.entries:
            raise ValueError(f"unknown {self.option} {name!r}; available: {', '.join(sorted(self.entries))}")
        return self.entries[name]
