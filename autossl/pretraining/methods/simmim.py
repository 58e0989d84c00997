"""SimMIM (Xie et al., CVPR 2022): masked image modelling for the planned transformer.

A share ``mask_ratio`` of the patch tokens of each image is replaced by a learned mask token
after the patch embedding (before the position embeddings); the transformer encodes the whole
sequence, a linear head (a 1x1 convolution on the token grid) predicts every token's voxels
(C x patch_embed_size), and the loss is the L1 distance to the input's voxels averaged over the
masked tokens only. One view per image. The masked-image-modelling stage of Semi-ViT's pipeline
(the paper pre-trains with MAE, which drops the masked tokens and decodes with a small
transformer; SimMIM's mask tokens keep the sequence whole, so Primus' rotary embeddings and 3D
grids need nothing else). Only the transformer (``autossl_pretrain ... --network transformer``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from autossl.networks.tokens import TransformerEncoder
from autossl.pretraining.base import PretrainMethod, embedding_std, opt
from autossl.pretraining.registry import register


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C·prod(patch), *grid): each token's voxels as channels, in the
    order (c, p_1, ..., p_d)."""
    b, c, *spatial = x.shape
    d = len(patch)
    grid = [s // p for s, p in zip(spatial, patch)]
    shape = [b, c]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)
    perm = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    return x.permute(perm).reshape(b, c * math.prod(patch), *grid)


def random_token_mask(batch: int, num_tokens: int, ratio: float, device) -> torch.Tensor:
    """(B, N) bool with exactly round(ratio·N) (at least 1) masked tokens per image, at random."""
    k = min(num_tokens, max(1, int(round(ratio * num_tokens))))
    ranks = torch.rand(batch, num_tokens, device=device).argsort(1).argsort(1)
    return ranks < k


@register("simmim")
class SimMIM(PretrainMethod):
    num_views = 1
    networks = ("transformer",)
    scalars = ("embedding_std", "masked_share")

    @classmethod
    def option_names(cls):
        return ("mask_ratio",)

    def __init__(self, encoder, **options):
        if not isinstance(encoder, TransformerEncoder):
            raise ValueError("--method simmim pre-trains the planned transformer: autossl_pretrain ... "
                             "--network transformer")
        super().__init__(encoder, **options)
        self.mask_ratio = opt(options, "mask_ratio", 0.6)
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--method simmim: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.patch = encoder.patch_embed_size
        conv = nn.Conv2d if len(self.patch) == 2 else nn.Conv3d
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = conv(encoder.embed_dim, encoder.input_channels * math.prod(self.patch), 1)

    def loss(self, views, ctx):
        x = views[0]
        target = patchify(x, self.patch)
        grid = target.shape[2:]
        mask = random_token_mask(x.shape[0], math.prod(grid), self.mask_ratio, x.device)
        tokens = self.encoder(x, token_mask=mask, mask_token=self.mask_token)
        error = (self.head(tokens) - target).abs().mean(1).flatten(1)  # (B, N)
        m = mask.float()
        loss = (error * m).sum() / m.sum()
        return loss, {"embedding_std": embedding_std(tokens.flatten(2).mean(-1)), "masked_share": float(m.mean())}
