"""nnU-Net v2's augmentation pipelines (batchgeneratorsv2), per sample on CPU tensors.

* ``training_transforms``: the labelled pipeline (spatial, noise, blur, brightness, contrast,
  low resolution, gamma, mirror, masking, remove label -1 -> 0, regions, deep-supervision
  downsampling), same transforms and probabilities as nnU-Net v2's default trainer.
* ``weak_transforms``: the unlabelled pipeline: the same geometry (spatial + mirror) and nothing
  else. Pseudo-labels, when present, travel as the segmentation; -1 (ignore) is kept and used as
  the padding label.
* ``validation_transforms``: remove label -1 -> 0 and deep-supervision downsampling.

``augmentation_geometry`` gives the rotation range, dummy-2D flag, mirror axes and the enlarged
initial patch size the loader must crop so that rotation and scaling never pull in padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

#: nnU-Net's threshold for "dummy 2D" augmentation of anisotropic 3D patches
ANISO_THRESHOLD = 3


@dataclass(frozen=True)
class AugmentationGeometry:
    rotation: tuple[float, float]          # radians, sampled per axis
    dummy_2d: bool                         # rotate/scale in-plane only (anisotropic 3D patches)
    mirror_axes: tuple[int, ...]           # spatial axes mirrored in training (and at test time)
    initial_patch_size: tuple[int, ...]    # what the loader crops before the spatial transform


def enlarged_patch_size(final_patch_size: Sequence[int], rot_x, rot_y, rot_z,
                        scale_range: tuple[float, float]) -> np.ndarray:
    """nnU-Net's ``get_patch_size``: the patch that still covers ``final_patch_size`` after the
    largest rotation (capped at 90 degrees) and the smallest scaling."""
    def _max_abs(r):
        return max(np.abs(r)) if isinstance(r, (tuple, list)) else r

    rot_x, rot_y, rot_z = (min(np.pi / 2, _max_abs(r)) for r in (rot_x, rot_y, rot_z))
    coords = np.array(final_patch_size)
    final_shape = np.copy(coords)
    if len(coords) == 3:
        final_shape = np.max(np.vstack((np.abs(rotate_coords_3d(coords, rot_x, 0, 0)), final_shape)), 0)
        final_shape = np.max(np.vstack((np.abs(rotate_coords_3d(coords, 0, rot_y, 0)), final_shape)), 0)
        final_shape = np.max(np.vstack((np.abs(rotate_coords_3d(coords, 0, 0, rot_z)), final_shape)), 0)
    elif len(coords) == 2:
        final_shape = np.max(np.vstack((np.abs(rotate_coords_2d(coords, rot_x)), final_shape)), 0)
    final_shape = final_shape / min(scale_range)
    return final_shape.astype(int)


def augmentation_geometry(patch_size: Sequence[int]) -> AugmentationGeometry:
    """Rotation, dummy-2D, mirroring and initial patch size as nnU-Net v2 chooses them."""
    patch_size = tuple(int(p) for p in patch_size)
    dim = len(patch_size)
    deg = np.pi / 180
    if dim == 2:
        dummy_2d = False
        rotation = (-15 * deg, 15 * deg) if max(patch_size) / min(patch_size) > 1.5 else (-180 * deg, 180 * deg)
        mirror_axes = (0, 1)
    elif dim == 3:
        dummy_2d = (max(patch_size) / patch_size[0]) > ANISO_THRESHOLD
        rotation = (-180 * deg, 180 * deg) if dummy_2d else (-30 * deg, 30 * deg)
        mirror_axes = (0, 1, 2)
    else:
        raise ValueError(f"patch size must be 2D or 3D, got {patch_size}")
    initial = enlarged_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
    if dummy_2d:
        initial[0] = patch_size[0]
    return AugmentationGeometry(rotation, dummy_2d, mirror_axes, tuple(int(i) for i in initial))


def _spatial(patch_size: Sequence[int], geometry: AugmentationGeometry, **seg_padding) -> list[BasicTransform]:
    out: list[BasicTransform] = []
    patch_spatial = tuple(patch_size)
    if geometry.dummy_2d:
        out.append(Convert3DTo2DTransform())
        patch_spatial = patch_spatial[1:]
    out.append(SpatialTransform(
        patch_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=0.2, rotation=geometry.rotation, p_scaling=0.2, scaling=(0.7, 1.4),
        p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, **seg_padding))
    if geometry.dummy_2d:
        out.append(Convert2DTo3DTransform())
    return out


def training_transforms(patch_size: Sequence[int], geometry: AugmentationGeometry,
                        deep_supervision_scales: Sequence[Sequence[float]] | None,
                        use_mask_for_norm: Sequence[bool] | None = None,
                        regions: Sequence | None = None, ignore_label: int | None = None) -> BasicTransform:
    """nnU-Net v2's default training pipeline."""
    ignore_axes = (0,) if geometry.dummy_2d else None
    t = _spatial(patch_size, geometry)
    t.append(RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                                    synchronize_channels=True), apply_probability=0.1))
    t.append(RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False,
                                                   synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                             apply_probability=0.2))
    t.append(RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                               synchronize_channels=False, p_per_channel=1),
                             apply_probability=0.15))
    t.append(RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                               synchronize_channels=False, p_per_channel=1),
                             apply_probability=0.15))
    t.append(RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                            synchronize_axes=True, ignore_axes=ignore_axes,
                                                            allowed_channels=None, p_per_channel=0.5),
                             apply_probability=0.25))
    t.append(RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                            p_per_channel=1, p_retain_stats=1), apply_probability=0.1))
    t.append(RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                            p_per_channel=1, p_retain_stats=1), apply_probability=0.3))
    if geometry.mirror_axes:
        t.append(MirrorTransform(allowed_axes=geometry.mirror_axes))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform(apply_to_channels=[i for i, m in enumerate(use_mask_for_norm) if m],
                                    channel_idx_in_seg=0, set_outside_to=0))
    t.append(RemoveLabelTansform(-1, 0))
    _targets(t, deep_supervision_scales, regions, ignore_label)
    return ComposeTransforms(t)


def weak_transforms(patch_size: Sequence[int], geometry: AugmentationGeometry,
                    deep_supervision_scales: Sequence[Sequence[float]] | None) -> BasicTransform:
    """Spatial + mirror only (the labelled pipeline's geometry); pseudo-labels keep -1 = ignore
    and are padded with -1 where the patch leaves the image."""
    t = _spatial(patch_size, geometry, border_mode_seg="constant", padding_value_seg=-1)
    if geometry.mirror_axes:
        t.append(MirrorTransform(allowed_axes=geometry.mirror_axes))
    if deep_supervision_scales is not None:
        t.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
    return ComposeTransforms(t)


def validation_transforms(deep_supervision_scales: Sequence[Sequence[float]] | None,
                          regions: Sequence | None = None, ignore_label: int | None = None) -> BasicTransform:
    t: list[BasicTransform] = [RemoveLabelTansform(-1, 0)]
    _targets(t, deep_supervision_scales, regions, ignore_label)
    return ComposeTransforms(t)


def _targets(t: list, deep_supervision_scales, regions, ignore_label) -> None:
    if regions is not None:
        t.append(ConvertSegmentationToRegionsTransform(
            regions=list(regions) + [ignore_label] if ignore_label is not None else list(regions), channel_in_seg=0))
    if deep_supervision_scales is not None:
        t.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
