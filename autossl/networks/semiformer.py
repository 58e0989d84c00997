"""Semiformer's network (Weng et al., ECCV 2022): the planned CNN and the planned transformer as
two branches that exchange features through fusion modules.

Built from the plans like any other network (``hybrid_architecture``, whose ``cnn`` and
``transformer`` keywords are the configuration's ``architecture`` and ``transformer_architecture``
entries, put in by ``networks.build.architecture_entry``). Each branch keeps its planned layers
and weights' names (``cnn.*``: the U-Net, ``transformer.*``: Primus / Primus2D); the fusion
modules (``fusions.*``) are the only new parameters.

Forward pass (2D and 3D alike):

1. the transformer embeds the patch into tokens on its grid (patch / ``patch_embed_size``);
2. the CNN encoder runs stage by stage; after each fusion stage s (``fusion_stages``; default
   every stage below full resolution) the transformer runs its next group of EVA blocks (the
   blocks are split evenly over the fusion points, the last group after the last one) and the two
   exchange features (``FusionModule``, Conformer's / Semiformer's feature coupling):
   CNN -> tokens: 1x1 convolution to the embedding width, average pooling (or nearest
   upsampling along an axis where the CNN map is coarser) to the token grid, LayerNorm, GELU,
   added to the tokens; tokens -> CNN: 1x1 convolution to the stage's channels, instance norm,
   LeakyReLU, nearest upsampling (or pooling) to the stage's resolution, added to the CNN map,
   which then goes on to the next stage and to the decoder as its skip;
3. the U-Net decoder turns the (fused) skips into the CNN's logits, the transformer's norm and
   decoder (``up_projection``) turn the tokens into the transformer's logits.

``forward(x, branches=True)`` returns ``(cnn_logits, transformer_logits)`` (training: the
method supervises both). ``forward(x)`` returns the prediction: ``predict="both"`` (default) the
mean of the two branches' logits (the paper's evaluation sums the two heads' logits: the same
argmax), ``"cnn"`` or ``"transformer"`` one branch; validation, the supervised warm start and
the predictor see this output. No deep supervision (the CNN branch returns full-resolution
logits only).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from autossl.networks import tokens as tk

PREDICT = ("both", "cnn", "transformer")


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *s) -> (B, C, *size): average pooling along the axes that shrink (adaptive, so also
    for ratios that are not integers), nearest-neighbour upsampling along the axes that grow."""
    size = tuple(int(t) for t in size)
    src = tuple(x.shape[2:])
    if src == size:
        return x
    pooled = tuple(min(s, t) for s, t in zip(src, size))
    if pooled != src:
        pool = F.adaptive_avg_pool2d if x.ndim == 4 else F.adaptive_avg_pool3d
        x = pool(x, pooled)
    if pooled != size:
        x = F.interpolate(x, size=size, mode="nearest")
    return x


class FusionModule(nn.Module):
    """Feature exchange between one CNN stage (C channels) and the transformer's tokens (D wide)."""

    def __init__(self, cnn_channels: int, embed_dim: int, dim: int):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        self.to_tokens = conv(cnn_channels, embed_dim, 1)
        self.token_norm = nn.LayerNorm(embed_dim)
        self.token_act = nn.GELU()
        self.to_cnn = conv(embed_dim, cnn_channels, 1)
        self.cnn_norm = norm(cnn_channels, affine=True)
        self.cnn_act = nn.LeakyReLU(1e-2)

    def cnn_to_tokens(self, feat: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, C, *spatial) -> (B, D, *grid)."""
        t = resize_to(self.to_tokens(feat), grid)
        return self.token_act(self.token_norm(t.movedim(1, -1))).movedim(-1, 1)

    def tokens_to_cnn(self, token_map: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """(B, D, *grid) -> (B, C, *spatial)."""
        return resize_to(self.cnn_act(self.cnn_norm(self.to_cnn(token_map))), spatial)

    def forward(self, feat: torch.Tensor, token_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both inputs before the exchange -> (CNN map + tokens' share, tokens + CNN's share)."""
        return (feat + self.tokens_to_cnn(token_map, feat.shape[2:]),
                token_map + self.cnn_to_tokens(feat, token_map.shape[2:]))


def _block_groups(depth: int, n_fusions: int) -> list[list[int]]:
    """Indices of the EVA blocks run before each fusion point, then after the last one."""
    return [list(map(int, g)) for g in np.array_split(np.arange(depth), n_fusions + 1)]


class Semiformer(nn.Module):
    """``cnn`` / ``transformer``: plans entries ({network_class_name, arch_kwargs, ...}) of the
    two branches; ``fusion_stages``: CNN encoder stages whose output is fused (None: 1 .. n-1,
    every stage below full resolution; a one-stage CNN fuses its only stage); ``predict``: the
    output of ``forward(x)`` (both | cnn | transformer)."""

    def __init__(self, input_channels: int, num_classes: int, cnn: dict, transformer: dict,
                 fusion_stages: Sequence[int] | None = None, predict: str = "both"):
        super().__init__()
        from autossl.networks.build import build_network

        where = "autossl.networks.semiformer.Semiformer"
        if predict not in PREDICT:
            raise ValueError(f"{where}: predict={predict!r} must be one of {', '.join(PREDICT)}")
        self.predict = predict
        self.cnn = build_network(cnn, input_channels, num_classes, deep_supervision=False)
        self.transformer = build_network(transformer, input_channels, num_classes)
        encoder = getattr(self.cnn, "encoder", None)
        if encoder is None or not hasattr(encoder, "stages") or not hasattr(self.cnn, "decoder"):
            raise ValueError(f"{where}: the CNN {cnn.get('network_class_name')} is not an encoder-decoder U-Net "
                             f"(encoder.stages, decoder)")
        tk.check_transformer(self.transformer, where)
        shape = transformer.get("arch_kwargs", {}).get("input_shape")
        self.input_shape = tuple(int(s) for s in shape) if shape is not None else None
        self.dim = len(self.transformer.down_projection.proj.kernel_size)
        n = len(encoder.stages)
        stages = list(range(1, n)) if fusion_stages is None else sorted({int(s) for s in fusion_stages})
        stages = stages or [0]
        if any(s < 0 or s >= n for s in stages):
            raise ValueError(f"{where}: fusion_stages {list(stages)} must be CNN encoder stages 0..{n - 1}")
        self.fusion_stages = stages
        self._fusion_of = {s: k for k, s in enumerate(stages)}
        embed_dim = int(self.transformer.eva.embed_dim)
        channels = [int(c) for c in encoder.output_channels]
        self.fusions = nn.ModuleList(FusionModule(channels[s], embed_dim, self.dim) for s in stages)
        self.fusions.apply(InitWeights_He(1e-2))
        self.block_groups = _block_groups(len(self.transformer.eva.blocks), len(stages))

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_shape is not None and tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"Semiformer expects patches of {self.input_shape} (the transformer's input_shape), "
                             f"got {tuple(x.shape[2:])}")
        vit, encoder = self.transformer, self.cnn.encoder
        blocks = vit.eva.blocks
        prefix = tk.num_prefix_tokens(vit)
        tokens, rope, grid = tk.embed(vit, x)
        feat = encoder.stem(x) if getattr(encoder, "stem", None) is not None else x
        skips = []
        for s, stage in enumerate(encoder.stages):
            feat = stage(feat)
            k = self._fusion_of.get(s)
            if k is not None:
                tokens = tk.run_blocks(vit, tokens, rope, [blocks[i] for i in self.block_groups[k]])
                feat, token_map = self.fusions[k](feat, tk.tokens_to_map(tokens, grid, prefix))
                tokens = tk.map_to_tokens(token_map, tokens, prefix)
            skips.append(feat)
        tokens = tk.run_blocks(vit, tokens, rope, [blocks[i] for i in self.block_groups[-1]])
        tokens = vit.eva.norm(tokens)
        vit_logits = vit.up_projection(tk.tokens_to_map(tokens, grid, prefix))
        cnn_logits = self.cnn.decoder(skips)
        return cnn_logits, vit_logits

    def combine(self, cnn_logits: torch.Tensor, vit_logits: torch.Tensor) -> torch.Tensor:
        if self.predict == "cnn":
            return cnn_logits
        if self.predict == "transformer":
            return vit_logits
        return 0.5 * (cnn_logits + vit_logits)

    def forward(self, x: torch.Tensor, branches: bool = False):
        cnn_logits, vit_logits = self._branches(x)
        if branches:
            return cnn_logits, vit_logits
        return self.combine(cnn_logits, vit_logits)
