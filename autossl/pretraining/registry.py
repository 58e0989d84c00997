"""Pre-training methods found by name (as ``autossl.ssl.registry``). ``@register("simclr")``."""
from __future__ import annotations

from autossl.utilities.registry import Registry

METHODS = Registry("pre-training method", "autossl.pretraining.methods", "--method")
register = METHODS.register


def available_methods() -> list[str]:
    return METHODS.available()


def get_method_class(name: str):
    return METHODS.get(name)


def create_method(name: str, encoder, num_samples: int = 0, **options):
    """``encoder``: the planned U-Net's ``net.encoder``; ``num_samples``: images in the dataset
    (memory banks); ``options``: ``--method-opt`` strings."""
    return get_method_class(name)(encoder, num_samples=num_samples, **options)
