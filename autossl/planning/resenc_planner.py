"""nnU-Net's residual-encoder presets, ResEnc M and L (``-pl nnUNetPlannerResEncM`` / ``ResEncL``).

nnU-Net v2's ``residual_encoder_unet_planners.py``: the default planner's rules with
``dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`` instead of
``PlainConvUNet``:

- encoder blocks per stage ``(1, 3, 4, 6, 6, 6, ...)`` (``BasicBlockD``, two convolutions and a
  residual connection each), one convolution per decoder stage (``n_conv_per_stage_decoder``),
  features ``32 * 2**i`` capped at 320 (3D) / 512 (2D), conv bias, InstanceNorm, LeakyReLU;
- feature-map references 680e6 (3D) / 135e6 (2D) for 8 GB (M) and 2.1e9 / 380e6 for 24 GB (L),
  at reference batch 2 (3D) / 12 (2D); the patch shrinks while the estimate exceeds the
  reference (``while estimate > reference``: in 2D until a batch of 12 fits, unlike the default
  planner's 2), then batch = round(reference / estimate x reference batch);
- ``max_dataset_covered = 1`` (no 5% batch cap), at least batch 2.

Differences from nnU-Net, both so that autossl never overwrites nnU-Net's own files:
- plans names ``autosslResEncUNetMPlans`` / ``autosslResEncUNetLPlans`` (nnU-Net:
  ``nnUNetResEncUNet{M,L}Plans``, which the ``-pl`` lookup also accepts);
- their data identifiers are their own (``autosslResEncUNetMPlans_3d_fullres``), where nnU-Net
  reuses ``nnUNetPlans_2d`` / ``_3d_fullres``: autossl's preprocessed folders record the patch
  size they were chunked for and are rebuilt when it changes, so two plans with different
  patches must not share one.

The estimate ``ResidualEncoderUNet.compute_conv_feature_map_size(patch)`` is computed directly
(``residual_encoder_unet_feature_map_size``, dynamic-network-architectures 0.4.x arithmetic,
checked against the class in the tests), so planning does not import torch.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from autossl.planning.default_planner import ExperimentPlanner

RESIDUAL_ENCODER_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def residual_encoder_unet_feature_map_size(patch_size: Sequence[int], arch_kwargs: dict, num_classes: int,
                                           deep_supervision: bool = False) -> int:
    """``ResidualEncoderUNet(**arch_kwargs).compute_conv_feature_map_size(patch_size)`` without
    building it: the stem (one conv at full size), per stage ``BasicBlockD`` blocks (two convs, plus
    the 1x1 projection of the skip in a block that changes size or width), then nnU-Net's decoder
    (convs + transposed conv per stage, the segmentation output at full size or every stage)."""
    n = int(arch_kwargs["n_stages"])
    dim = len(patch_size)

    def per_stage(v, count):
        return list(v) if isinstance(v, (list, tuple)) else [v] * count

    feats = [int(f) for f in per_stage(arch_kwargs["features_per_stage"], n)]
    strides = [[int(x) for x in per_stage(s, dim)] for s in per_stage(arch_kwargs["strides"], n)]
    blocks = [int(b) for b in per_stage(arch_kwargs["n_blocks_per_stage"], n)]
    n_conv_dec = [int(c) for c in per_stage(arch_kwargs["n_conv_per_stage_decoder"], n - 1)]
    size = [int(p) for p in patch_size]
    total = feats[0] * int(np.prod(size, dtype=np.int64))  # stem (stem_channels = features[0])
    in_ch = feats[0]
    for s in range(n):
        after = [i // j for i, j in zip(size, strides[s])]
        vox = int(np.prod(after, dtype=np.int64))
        total += 2 * feats[s] * vox  # first block: conv1 (strided) + conv2
        if in_ch != feats[s] or after != size:
            total += feats[s] * vox  # its projected skip
        total += (blocks[s] - 1) * 2 * feats[s] * vox
        in_ch, size = feats[s], after
    skips, size = [], [int(p) for p in patch_size]
    for s in range(n - 1):
        size = [i // j for i, j in zip(size, strides[s])]
        skips.append(size)
    for s in range(n - 1):  # decoder
        vox = int(np.prod(skips[-(s + 1)], dtype=np.int64))
        f = feats[-(s + 2)]
        total += n_conv_dec[s] * f * vox + f * vox
        if deep_supervision or s == n - 2:
            total += int(num_classes) * vox
    return total


class ResEncUNetPlanner(ExperimentPlanner):
    """nnU-Net's ``ResEncUNetPlanner``: ResidualEncoderUNet at the default planner's budget (8 GB)."""

    default_plans_name = "autosslResEncUNetPlans"
    default_gpu_memory_target_in_gb = 8.0

    UNet_class_name = RESIDUAL_ENCODER_UNET
    UNet_reference_val_3d = 680_000_000
    UNet_reference_val_2d = 135_000_000
    UNet_reference_val_corresp_GB = 8
    UNet_blocks_per_stage_encoder = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
    UNet_blocks_per_stage_decoder = (1,) * 12
    # nnU-Net's ResEnc loop is ``while estimate > reference``: shrink until the reference batch fits
    UNet_shrink_until_batch_size_2d = ExperimentPlanner.UNet_reference_val_corresp_bs_2d
    UNet_shrink_until_batch_size_3d = ExperimentPlanner.UNet_reference_val_corresp_bs_3d

    def __init__(self, dataset: str | int, gpu_memory_target_in_gb: float | None = None, plans_name: str | None = None,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False,
                 preprocessor_name: str = "DefaultPreprocessor"):
        if gpu_memory_target_in_gb is None:
            gpu_memory_target_in_gb = self.default_gpu_memory_target_in_gb
        elif float(gpu_memory_target_in_gb) != self.default_gpu_memory_target_in_gb:
            warnings.warn(f"{type(self).__name__} is nnU-Net's preset for {self.default_gpu_memory_target_in_gb:g} GB; "
                          f"-gpu_memory_target {gpu_memory_target_in_gb:g} scales its references", stacklevel=2)
        super().__init__(dataset, gpu_memory_target_in_gb, plans_name, overwrite_target_spacing, suppress_transpose,
                         preprocessor_name)

    def architecture(self, dim: int, conv_kernel_sizes, pool_op_kernel_sizes) -> dict:
        arch = super().architecture(dim, conv_kernel_sizes, pool_op_kernel_sizes)
        num_stages = arch["arch_kwargs"]["n_stages"]
        kwargs = {}
        for k, v in arch["arch_kwargs"].items():  # nnU-Net's key order: ..., strides, n_blocks_per_stage, ...
            if k == "n_conv_per_stage":
                kwargs["n_blocks_per_stage"] = list(self.UNet_blocks_per_stage_encoder[:num_stages])
            else:
                kwargs[k] = v
        arch["arch_kwargs"] = kwargs
        return arch

    def static_estimate_VRAM_usage(self, patch_size, architecture: dict) -> float:
        if architecture["network_class_name"] != RESIDUAL_ENCODER_UNET:
            return super().static_estimate_VRAM_usage(patch_size, architecture)
        return float(residual_encoder_unet_feature_map_size(patch_size, architecture["arch_kwargs"],
                                                            self.num_output_channels))


class ResEncMPlanner(ResEncUNetPlanner):
    """nnU-Net's ``nnUNetPlannerResEncM``: ~9-11 GB of GPU memory (RTX 2080 Ti class)."""

    default_plans_name = "autosslResEncUNetMPlans"
    default_gpu_memory_target_in_gb = 8.0
    UNet_reference_val_corresp_GB = 8
    max_dataset_covered = 1.0


class ResEncLPlanner(ResEncUNetPlanner):
    """nnU-Net's ``nnUNetPlannerResEncL``: ~24 GB of GPU memory (RTX 4090 class), nnU-Net's
    recommended default."""

    default_plans_name = "autosslResEncUNetLPlans"
    default_gpu_memory_target_in_gb = 24.0
    UNet_reference_val_3d = 2_100_000_000
    UNet_reference_val_2d = 380_000_000
    UNet_reference_val_corresp_GB = 24
    max_dataset_covered = 1.0
