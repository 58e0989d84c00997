"""Methods found by name (timm-style registry). ``@register("mean_teacher")`` on the class."""
from __future__ import annotations

from autossl.ssl.base import SSLMethod
from autossl.utilities.registry import Registry

METHODS = Registry("SSL method", "autossl.ssl.methods", "--ssl method")
register = METHODS.register


def available_methods() -> list[str]:
    return METHODS.available()


def get_method_class(name: str) -> type[SSLMethod]:
    return METHODS.get(name)


def create_method(name: str, **options) -> SSLMethod:
    return get_method_class(name)(**options)
