"""Masked image modelling for the planned U-Net, encoder *and decoder* (the CNN masked
autoencoder of nnssl / SparK, Tian et al., ICLR 2023, without sparse convolutions).

Every other CNN method here pre-trains the encoder alone, through a pooled global embedding; a
segmentation network fine-tuned from it still starts its decoder from random weights. This one
trains the whole planned U-Net as a dense reconstructor: the image is cut into blocks of the
encoder's total stride per axis (16 x 16 for a 5-stage 2D plan: one bottleneck cell each), a
share ``mask_ratio`` of the blocks is set to 0 (the mean of the z-scored intensities), and the
network, its segmentation heads replaced by a 1x1 convolution to the input channels, predicts
the image; the loss is the squared error over the masked voxels only. One view.

The checkpoint keeps the encoder and the decoder (``decoder.stages.*``, ``decoder.transpconvs.*``)
under the planned network's keys; fine-tuning loads both and leaves only the segmentation
heads at their initialisation. Departures from SparK: dense convolutions see the zeroed blocks
(no sparse convolution, no mask token per stage), one decoder (the planned one) instead of a
light one, mean squared error on the z-scored image rather than on per-patch normalised pixels.
"""
from __future__ import annotations

import math

import torch

from autossl.pretraining.base import PretrainMethod, embedding_std, opt
from autossl.pretraining.methods.simmim import random_token_mask
from autossl.pretraining.registry import register


def total_strides(encoder) -> tuple[int, ...]:
    """The product of an encoder's per-stage strides, per axis (dynamic_network_architectures'
    encoders keep every stage's stride as a per-axis list)."""
    return tuple(int(math.prod(axis)) for axis in zip(*encoder.strides))


def block_mask(shape: tuple[int, ...], block: tuple[int, ...], ratio: float, batch: int, device) -> torch.Tensor:
    """(B, 1, *shape) float mask, 1 on masked voxels: the image cut into ``block``-sized cells
    (the last ones cropped), exactly round(ratio · cells) of them (at least 1) masked per image."""
    grid = [math.ceil(s / b) for s, b in zip(shape, block)]
    m = random_token_mask(batch, math.prod(grid), ratio, device).view(batch, 1, *grid).float()
    for axis, b in enumerate(block):
        m = m.repeat_interleave(b, dim=axis + 2)
    return m[(slice(None), slice(None), *[slice(0, s) for s in shape])]


@register("mae")
class MaskedUNet(PretrainMethod):
    num_views = 1
    networks = ("cnn",)
    #: the trainer hands over the whole planned U-Net (heads with the input's channels, no deep
    #: supervision) and keeps its decoder in the checkpoint
    whole_network = True
    scalars = ("embedding_std", "masked_share")

    @classmethod
    def option_names(cls):
        return ("mask_ratio",)

    def __init__(self, net, **options):
        if not (hasattr(net, "encoder") and hasattr(net, "decoder")):
            raise ValueError("--method mae pre-trains the planned U-Net (encoder and decoder), got "
                             f"{type(net).__name__}")
        super().__init__(net.encoder, **options)
        self.net = net
        self.mask_ratio = opt(options, "mask_ratio", 0.6)
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--method mae: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.block = total_strides(net.encoder)

    def loss(self, views, ctx):
        x = views[0]
        m = block_mask(tuple(x.shape[2:]), self.block, self.mask_ratio, x.shape[0], x.device)
        skips = self.net.encoder(x * (1 - m))
        out = self.net.decoder(skips)
        out = out[0] if isinstance(out, (list, tuple)) else out
        error = ((out.float() - x.float()) ** 2).mean(1, keepdim=True)
        loss = (error * m).sum() / m.sum().clamp_min(1)
        return loss, {"embedding_std": embedding_std(skips[-1].flatten(2).mean(-1)), "masked_share": float(m.mean())}
