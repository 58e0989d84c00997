"""Primus2D: the 2D counterpart of dynamic_network_architectures' Primus (3D only there).

Same constructor keywords and meaning as ``dynamic_network_architectures.architectures.primus.Primus``:
a strided ``Conv2d`` patch embedding (``PatchEmbed``, dimension-agnostic in DNA), the EVA
transformer from DNA (timm ``EvaBlock``s) with 2D rotary position embeddings (timm
``RotaryEmbeddingCat`` over the 2D token grid; rotary dim = head dim) plus learned absolute
position embeddings (both on by default, as in Primus), and a light decoder of transposed
convolutions (Primus' ``PatchDecode`` in 2D) that upsamples the token grid back to full
resolution. No deep supervision (one output tensor). Weights are initialised as in Primus: He
init (neg. slope 1e-2) for the patch embedding and decoder, EVA's own truncated-normal init for
the transformer. Like Primus it has no ``initialize`` static method.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.eva import Eva
from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd, PatchEmbed
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from einops import rearrange
from timm.layers import RotaryEmbeddingCat
from torch import nn


def _decoder_stages(patch_size: Sequence[int]) -> list[list[int]]:
    """Per-stage strides of the decoder (lowest resolution first), as Primus' PatchDecode."""
    num_stages = int(np.log(max(patch_size)) / np.log(2))
    strides = [[2 if (p / 2 ** n) % 2 == 0 else 1 for p in patch_size] for n in range(num_stages)][::-1]
    return strides


class PatchDecode2D(nn.Module):
    """Primus' PatchDecode with 2D transposed convolutions: log2(max patch) stages of stride 2
    (1 along axes already at full resolution), channels shrinking geometrically from
    ``embed_dim`` to ``out_channels``, norm + activation between stages."""

    def __init__(self, patch_size: Sequence[int], embed_dim: int, out_channels: int,
                 norm=LayerNormNd, activation=nn.GELU):
        super().__init__()

        def _round_to_8(inp):
            return int(max(8, np.round((inp + 1e-6) / 8) * 8))

        strides = _decoder_stages(patch_size)
        num_stages = len(strides)
        dim_red = (embed_dim / (2 * out_channels)) ** (1 / num_stages)
        channels = [embed_dim] + [_round_to_8(embed_dim / dim_red ** (x + 1)) for x in range(num_stages)]
        channels[-1] = out_channels
        stages: list[nn.Module] = []
        for s in range(num_stages - 1):
            stages.append(nn.Sequential(
                nn.ConvTranspose2d(channels[s], channels[s + 1], kernel_size=strides[s], stride=strides[s]),
                norm(channels[s + 1]),
                activation(),
            ))
        stages.append(nn.ConvTranspose2d(channels[-2], channels[-1], kernel_size=strides[-1], stride=strides[-1]))
        self.decode = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x)


class _Eva(Eva):
    """DNA's Eva with patch dropout working on current timm: rotary embeddings gathered for the
    kept patches get the head axis timm's attention expects (B, 1, N, dim)."""

    def _pos_embed(self, x):
        x, rot_pos_embed, keep_indices = super()._pos_embed(x)
        if keep_indices is not None and rot_pos_embed is not None and rot_pos_embed.ndim == 3:
            rot_pos_embed = rot_pos_embed.unsqueeze(1)
        return x, rot_pos_embed, keep_indices


def _patch_dropout_with_indices(rate: float, num_prefix_tokens: int) -> nn.Module:
    """timm's patch dropout that also returns the kept indices (the class differs across timm versions)."""
    try:
        from timm.layers import PatchDropoutWithIndices
    except ImportError:  # older timm: PatchDropout(return_indices=True)
        from timm.layers import PatchDropout
        return PatchDropout(rate, num_prefix_tokens=num_prefix_tokens, return_indices=True)
    return PatchDropoutWithIndices(rate, num_prefix_tokens=num_prefix_tokens)


def _check_args(embed_dim: int, patch_embed_size, eva_numheads: int, input_shape, use_rot_pos_emb: bool) -> None:
    where = "autossl.networks.transformer2d.Primus2D"
    if input_shape is None:
        raise ValueError(f"{where}: input_shape (the 2D patch size) is required")
    if len(input_shape) != 2 or len(patch_embed_size) != 2:
        raise ValueError(f"{where}: input_shape {tuple(input_shape)} and patch_embed_size "
                         f"{tuple(patch_embed_size)} must both have 2 entries (use Primus for 3D)")
    bad = [(s, p) for s, p in zip(input_shape, patch_embed_size) if s % p != 0]
    if bad:
        raise ValueError(f"{where}: input_shape {tuple(input_shape)} is not divisible by patch_embed_size "
                         f"{tuple(patch_embed_size)} (side, patch) = {bad}")
    if any(p < 1 or (p & (p - 1)) != 0 for p in patch_embed_size) or max(patch_embed_size) < 2:
        raise ValueError(f"{where}: patch_embed_size {tuple(patch_embed_size)} entries must be powers of two, "
                         f"the largest >= 2 (the decoder upsamples by 2 per stage, as Primus)")
    if embed_dim % eva_numheads != 0:
        raise ValueError(f"{where}: embed_dim {embed_dim} is not divisible by eva_numheads {eva_numheads}")
    if use_rot_pos_emb and (embed_dim // eva_numheads) % 4 != 0:
        raise ValueError(f"{where}: 2D rotary embeddings need a head dimension divisible by 4, got "
                         f"embed_dim {embed_dim} / eva_numheads {eva_numheads} = {embed_dim // eva_numheads}")


class Primus2D(AbstractDynamicNetworkArchitectures):
    """Primus for 2D inputs (B, C, X, Y) with X, Y = ``input_shape``; returns (B, num_classes, X, Y)."""

    def __init__(
        self,
        input_channels: int,
        embed_dim: int,
        patch_embed_size: Sequence[int],
        num_classes: int,
        eva_depth: int = 24,
        eva_numheads: int = 16,
        input_shape: Sequence[int] | None = None,
        decoder_norm=LayerNormNd,
        decoder_act=nn.GELU,
        num_register_tokens: int = 0,
        use_rot_pos_emb: bool = True,
        use_abs_pos_embed: bool = True,
        mlp_ratio: float = 4 * 2 / 3,
        drop_path_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        rope_impl=RotaryEmbeddingCat,
        rope_kwargs: dict | None = None,
        init_values: float | None = None,
        scale_attn_inner: bool = False,
    ):
        patch_embed_size = tuple(int(p) for p in patch_embed_size)
        input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        _check_args(embed_dim, patch_embed_size, eva_numheads, input_shape, use_rot_pos_emb)
        super().__init__()
        self.embed_dim = embed_dim
        self.input_shape = input_shape
        self.patch_embed_size = patch_embed_size
        self.key_to_encoder = "eva"
        self.key_to_stem = "down_projection"
        self.keys_to_in_proj = ("down_projection.proj",)
        self.key_to_lpe = "eva.pos_embed"

        self.down_projection = PatchEmbed(patch_embed_size, input_channels, embed_dim)  # Conv2d, stride = patch
        self.up_projection = PatchDecode2D(patch_embed_size, embed_dim, num_classes, norm=decoder_norm,
                                           activation=decoder_act)
        self.eva = _Eva(
            embed_dim=embed_dim,
            depth=eva_depth,
            num_heads=eva_numheads,
            ref_feat_shape=tuple(i // p for i, p in zip(input_shape, patch_embed_size)),
            num_reg_tokens=num_register_tokens,
            use_rot_pos_emb=use_rot_pos_emb,
            use_abs_pos_emb=use_abs_pos_embed,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            patch_drop_rate=0.0,  # set below: DNA's Eva passes a keyword newer timm lacks
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            rope_impl=rope_impl,
            rope_kwargs=rope_kwargs,
            init_values=init_values,
            scale_attn_inner=scale_attn_inner,
        )
        if patch_drop_rate > 0:
            self.eva.patch_drop = _patch_dropout_with_indices(patch_drop_rate, num_register_tokens)
        self.mask_token: torch.Tensor
        self.register_buffer("mask_token", torch.zeros(1, 1, embed_dim))
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            nn.init.normal_(self.register_tokens, std=1e-6)
        else:
            self.register_tokens = None

        self.down_projection.apply(InitWeights_He(1e-2))
        self.up_projection.apply(InitWeights_He(1e-2))
        # eva has its own initialisation

    def restore_full_sequence(self, x: torch.Tensor, keep_indices, num_patches: int):
        """Fill patches dropped by patch dropout with the mask token, in their original order."""
        if keep_indices is None:
            return x, None
        b, _, c = x.shape
        restored = self.mask_token.to(x.dtype).expand(b, num_patches, c).clone()
        restored_mask = torch.zeros(b, num_patches, dtype=torch.bool, device=x.device)
        for i in range(b):
            restored[i, keep_indices[i]] = x[i]
            restored_mask[i, keep_indices[i]] = True
        return restored, restored_mask

    def forward(self, x: torch.Tensor, ret_mask: bool = False):
        if x.ndim != 4 or tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"Primus2D expects input (B, C, {self.input_shape[0]}, {self.input_shape[1]}) "
                             f"(its input_shape; position embeddings are fixed to it), got {tuple(x.shape)}")
        full_w, full_h = x.shape[2:]
        x = self.down_projection(x)
        _, _, w, h = x.shape
        num_patches = w * h
        x = rearrange(x, "b c w h -> b (w h) c")
        if self.register_tokens is not None:
            x = torch.cat((self.register_tokens.expand(x.shape[0], -1, -1), x), dim=1)
        x, keep_indices = self.eva(x)
        if self.register_tokens is not None:
            x = x[:, self.register_tokens.shape[1]:]
        restored_x, restoration_mask = self.restore_full_sequence(x, keep_indices, num_patches)
        x = rearrange(restored_x, "b (w h) c -> b c w h", w=w, h=h)
        full_mask = None
        if restoration_mask is not None:
            mask = rearrange(restoration_mask, "b (w h) -> b w h", w=w, h=h)
            full_mask = mask.repeat_interleave(full_w // w, dim=1).repeat_interleave(full_h // h, dim=2)[:, None]
        out = self.up_projection(x)
        return (out, full_mask) if ret_mask else out
