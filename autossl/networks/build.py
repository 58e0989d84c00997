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


class _ConvDropout:
    """Forward hook: element-wise dropout on a convolution's output while its module trains."""

    def __init__(self, p: float):
        self.p = float(p)

    def __call__(self, module: nn.Module, inputs, output):
        return nn.functional.dropout(output, self.p, training=module.training)


def add_dropout(net: nn.Module, p: float) -> int:
    """Element-wise dropout after every convolution of the network's conv blocks (where
    dynamic-network-architectures' ``dropout_op`` would sit: conv -> dropout -> norm ->
    nonlinearity), as forward hooks, so the state-dict keys stay those of the plain planned
    network: checkpoints load into it for prediction and warm starts from runs without dropout
    fit. The plans' U-Nets have none; a method whose perturbation is dropout (a mean teacher's)
    asks for it through ``NetworkSpec.dropout``. Active in train mode only. Returns the number of
    convolutions hooked."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    if p == 0:
        return 0
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    n = 0
    for m in net.modules():
        if isinstance(m, ConvDropoutNormReLU):
            m.conv.register_forward_hook(_ConvDropout(p))
            n += 1
    if n == 0:
        raise ValueError(f"{type(net).__name__} has no convolution blocks to carry dropout: dropout needs a "
                         f"U-Net of the plans")
    return n


def has_deep_supervision(net: nn.Module) -> bool:
    dec = getattr(net, "decoder", None)
    return bool(getattr(dec, "deep_supervision", False))


def set_deep_supervision(net: nn.Module, enabled: bool) -> None:
    net = getattr(net, "module", net)  # DDP / compiled
    dec = getattr(net, "decoder", None)
    if dec is not None and hasattr(dec, "deep_supervision"):
        dec.deep_supervision = enabled
