"""Pre-training methods found by name (as ``autossl.ssl.registry``). ``@register("simclr")``."""
from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pre-training method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _import_all() -> None:
    import autossl.pretraining.methods as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")


def available_methods() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_method_class(name: str):
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown --method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, encoder, num_samples: int = 0, **options):
    """``encoder``: the planned U-Net's ``net.encoder``; ``num_samples``: images in the dataset
    (memory banks); ``options``: ``--method-opt`` strings."""
    return get_method_class(name)(encoder, num_samples=num_samples, **options)
