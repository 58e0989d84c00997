"""Build a network from plans: class name + kwargs, strings resolved with pydoc.locate (nnU-Net style)."""
from __future__ import annotations

import inspect
import pydoc
from copy import deepcopy

import torch.nn as nn


def locate(name: str):
    obj = pydoc.locate(name)
    if obj is None:
        raise ImportError(f"cannot import {name!r} named in the plans")
    return obj


def build_network(architecture: dict, input_channels: int, num_classes: int,
                  deep_supervision: bool = True) -> nn.Module:
    """``architecture`` = {network_class_name, arch_kwargs, _kw_requires_import}."""
    cls = locate(architecture["network_class_name"])
    kwargs = deepcopy(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is not None:
            kwargs[key] = locate(kwargs[key])
    params = inspect.signature(cls.__init__).parameters
    if "deep_supervision" in params:
        kwargs["deep_supervision"] = deep_supervision
    net = cls(input_channels=input_channels, num_classes=num_classes, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def has_deep_supervision(net: nn.Module) -> bool:
    dec = getattr(net, "decoder", None)
    return bool(getattr(dec, "deep_supervision", False))


def set_deep_supervision(net: nn.Module, enabled: bool) -> None:
    net = getattr(net, "module", net)  # DDP / compiled
    dec = getattr(net, "decoder", None)
    if dec is not None and hasattr(dec, "deep_supervision"):
        dec.deep_supervision = enabled
