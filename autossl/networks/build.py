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


#: network kinds (``NetworkSpec.arch``) and the entry of a plans configuration each is built from.
#: "hybrid" is a network made of the planned CNN and the planned transformer together (Semiformer's
#: two branches joined by fusion modules, ``autossl.networks.semiformer``); its entry references the
#: other two (``autossl.networks.entries.hybrid_architecture``).
ARCHITECTURE_KEYS = {
    "cnn": "architecture",
    "transformer": "transformer_architecture",
    "hybrid": "hybrid_architecture",
}


class ArchitectureError(ValueError):
    """A configuration lacks the entry a network kind needs."""


def architecture_entry(configuration: dict, kind: str, where: str = "the plans") -> dict:
    """The plans entry for a network kind (``ARCHITECTURE_KEYS``), with the entries it references
    (``_kw_plans_entries``) resolved into its ``arch_kwargs``, ready for ``build_network``.
    ``configuration``: the resolved configuration dict; ``where`` names it in errors."""
    if kind not in ARCHITECTURE_KEYS:
        raise ArchitectureError(f"unknown network kind {kind!r}; expected one of {', '.join(ARCHITECTURE_KEYS)}")
    key = ARCHITECTURE_KEYS[kind]
    entry = configuration.get(key)
    if entry is None and kind == "hybrid" and key not in configuration:  # plans written before the entry
        from autossl.networks.entries import hybrid_architecture

        entry = hybrid_architecture()
    if not entry:
        if kind in ("transformer", "hybrid") and key in configuration:  # the planner wrote null
            raise ArchitectureError(f"{where}: {key!r} is null: this configuration has no transformer (its patch "
                                    f"has no even axis for Primus' patch embedding)")
        raise ArchitectureError(f"{where}: no {key!r}; re-plan with autossl_plan_and_preprocess (nnU-Net plans "
                                f"older than v2.5 lack 'architecture')")
    refs = entry.get("_kw_plans_entries") or ()
    if not refs:
        return entry
    entry = deepcopy(entry)
    for kw in refs:
        name = entry["arch_kwargs"].get(kw)
        sub = configuration.get(name) if isinstance(name, str) else None
        if not sub:
            raise ArchitectureError(f"{where}: {key!r} builds its {kw!r} part from {name!r}, which this "
                                    f"configuration does not have" + (
                                        " (its patch has no even axis, so no transformer was planned)"
                                        if name == "transformer_architecture" and name in configuration else ""))
        entry["arch_kwargs"][kw] = deepcopy(sub)
    entry.pop("_kw_plans_entries")
    return entry


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
    """Forward hook: element-wise dropout on a convolution's output while its module trains and
    the hook is ``active`` (the trainer switches it off during a supervised warm start)."""

    def __init__(self, p: float):
        self.p = float(p)
        self.active = True

    def __call__(self, module: nn.Module, inputs, output):
        return nn.functional.dropout(output, self.p, training=module.training and self.active)


#: SSL4MIS's U-Net: dropout after the first convolution of each encoder block, growing with depth
SSL4MIS_ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


def encoder_dropout_rates(n_stages: int, p_max: float) -> list[float]:
    """Per encoder stage: SSL4MIS's rates (0.05 ... 0.5 over its five stages) spread over
    ``n_stages`` and scaled so that the deepest stage gets ``p_max``."""
    import numpy as np

    ref = np.asarray(SSL4MIS_ENCODER_DROPOUT)
    x = np.linspace(0, 1, len(ref))
    pos = np.linspace(0, 1, n_stages) if n_stages > 1 else np.ones(1)
    return [float(v) for v in np.interp(pos, x, ref) * (p_max / ref[-1])]


def add_dropout(net: nn.Module, p_max: float) -> list[float]:
    """Element-wise dropout in the encoder as SSL4MIS's U-Net has it: after the first convolution
    of each encoder stage, rates growing with depth to ``p_max`` at the bottleneck
    (``encoder_dropout_rates``). Added as forward hooks, so the state-dict keys stay those of the
    plain planned network: checkpoints load into it for prediction and warm starts from runs
    without dropout fit. The plans' U-Nets have none; a method whose perturbation is dropout (a
    mean teacher's) asks for it through ``NetworkSpec.dropout``. Active in train mode only.
    Returns the hooks (``.p`` the rate, ``.active`` a switch), one per encoder stage."""
    if not 0 <= p_max < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p_max}")
    if p_max == 0:
        return []
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

    stages = getattr(getattr(net, "encoder", None), "stages", None)
    if stages is None:
        raise ValueError(f"{type(net).__name__} has no encoder stages to carry dropout: dropout needs a U-Net "
                         f"of the plans")
    hooks = []
    for stage, rate in zip(stages, encoder_dropout_rates(len(stages), p_max)):
        first = next((m for m in stage.modules() if isinstance(m, ConvDropoutNormReLU)), None)
        if first is None:
            raise ValueError(f"{type(net).__name__}: an encoder stage has no convolution block for dropout")
        hook = _ConvDropout(rate)
        first.conv.register_forward_hook(hook)
        hooks.append(hook)
    return hooks


def has_deep_supervision(net: nn.Module) -> bool:
    dec = getattr(net, "decoder", None)
    return bool(getattr(dec, "deep_supervision", False))


def set_deep_supervision(net: nn.Module, enabled: bool) -> None:
    net = getattr(net, "module", net)  # DDP / compiled
    dec = getattr(net, "decoder", None)
    if dec is not None and hasattr(dec, "deep_supervision"):
        dec.deep_supervision = enabled
