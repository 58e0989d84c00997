"""Methods found by name (timm-style registry). ``@register("mean_teacher")`` on the class."""
from __future__ import annotations

import importlib
import pkgutil

from autossl.ssl.base import SSLMethod

_REGISTRY: dict[str, type[SSLMethod]] = {}


def register(name: str):
    def deco(cls: type[SSLMethod]):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SSL method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _import_all() -> None:
    import autossl.ssl.methods as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")


def available_methods() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[SSLMethod]:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown --ssl method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, **options) -> SSLMethod:
    return get_method_class(name)(**options)
