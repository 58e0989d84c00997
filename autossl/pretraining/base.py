"""The pre-training method interface, the pooled encoder and the heads.

A method is an ``nn.Module`` that owns the encoder (``self.encoder``: the planned U-Net's
``net.encoder``, or the planned transformer's patch embedding and blocks,
``networks.tokens.TransformerEncoder``, wrapped with global average pooling of its deepest
stage / its output tokens) and its own heads,
momentum copies, queues and memory banks (parameters and buffers, so ``state_dict`` keeps all
of it for ``--c``). ``loss(views, ctx)`` turns the views of a batch into a scalar loss and a
dict of health figures; ``after_step(ctx)`` runs after the optimiser step (EMA updates,
queue pushes). Options arrive as strings from ``--method-opt key=value``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class StepContext:
    step: int            # steps done before this one
    total_steps: int
    indices: torch.Tensor | None = None  # dataset index of every sample (memory banks)
    num_samples: int = 0                 # images in the dataset


class PooledEncoder(nn.Module):
    """``encoder(x)`` -> deepest feature map -> global average pooling -> (B, C)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(encoder.output_channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        last = feats[-1] if isinstance(feats, (list, tuple)) else feats
        return last.flatten(2).mean(-1)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, bn_last: bool = False) -> nn.Sequential:
    """``layers`` linear layers, BatchNorm + ReLU between them (SimCLR/MoCo v2/BYOL heads)."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    if bn_last:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


def momentum_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module)
    m.requires_grad_(False)
    return m


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi k / K) + 1) / 2, from ``base`` to 1."""
    import math

    k = min(max(step, 0), max(total, 1))
    return 1 - (1 - base) * (math.cos(math.pi * k / max(total, 1)) + 1) / 2


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised embeddings: about 1/sqrt(d) when healthy, 0
    at collapse (SimSiam's figure)."""
    z = F.normalize(z.float(), dim=1)
    return float(z.std(dim=0).mean())


class PretrainMethod(nn.Module):
    name = "?"
    #: views per sample the loader makes
    num_views = 2
    #: default learning rate (AdamW) when --lr is not given
    default_lr = 1e-3
    #: health figures the method logs per epoch (also drawn in progress.png)
    scalars: tuple[str, ...] = ("embedding_std",)
    #: encoders it pre-trains (``autossl_pretrain --network``): the pooled-feature methods take the
    #: planned U-Net's encoder and the planned transformer's alike
    networks: tuple[str, ...] = ("cnn", "transformer")

    def __init__(self, encoder: nn.Module, num_samples: int = 0, **options):
        super().__init__()
        self.backbone = PooledEncoder(encoder)
        unknown = set(options) - set(self.option_names())
        if unknown:
            raise ValueError(f"--method {self.name}: unknown option(s) {sorted(unknown)}; it takes "
                             f"{', '.join(self.option_names()) or 'none'}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ()

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder

    def loss(self, views: list[torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        pass


def opt(options: dict, key: str, default, cast=float):
    v = options.get(key, default)
    if cast is bool and isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return cast(v)
