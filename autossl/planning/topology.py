"""U-Net topology from spacing and patch size: nnU-Net v2's ``get_pool_and_conv_props`` rules.

Pooling proceeds stage by stage. An axis may pool while its feature map is at least
``2 * min_feature_map_size`` voxels and its current spacing is less than twice the smallest
spacing among the axes that may pool; if only one axis qualifies it needs at least
``3 * min_feature_map_size`` voxels. An axis's conv kernel becomes 3 (and stays 3) once its
spacing is within a factor 2 of the smallest current spacing, else it is 1. The bottleneck
kernel is always 3; the first stage has stride 1. The patch is then padded up to a multiple of
``2 ** pools`` per axis.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def get_shape_must_be_divisible_by(num_pool_per_axis: Sequence[int]) -> np.ndarray:
    return 2 ** np.array(num_pool_per_axis)


def pad_shape(shape: Sequence[int], must_be_divisible_by: Sequence[int] | int) -> np.ndarray:
    """Round each axis up to the next multiple (an axis already divisible is kept)."""
    if not isinstance(must_be_divisible_by, (tuple, list, np.ndarray)):
        must_be_divisible_by = [must_be_divisible_by] * len(shape)
    if len(must_be_divisible_by) != len(shape):
        raise ValueError(f"shape {tuple(shape)} and divisors {tuple(must_be_divisible_by)} differ in length")
    out = [int(np.ceil(s / d) * d) for s, d in zip(shape, must_be_divisible_by)]
    return np.array(out).astype(int)


def get_pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int = 4,
                            max_numpool: int = 999999):
    """Returns ``(num_pool_per_axis, pool_op_kernel_sizes, conv_kernel_sizes, patch_size, must_be_divisible_by)``.

    ``pool_op_kernel_sizes`` starts with ``[1, ...]`` (the first stage does not pool) and has one
    entry per stage; ``conv_kernel_sizes`` has one entry per stage as well (bottleneck last)."""
    dim = len(spacing)
    if len(patch_size) != dim:
        raise ValueError(f"spacing {tuple(spacing)} and patch size {tuple(patch_size)} differ in length")
    current_spacing = [float(s) for s in spacing]
    current_size = [int(s) for s in patch_size]

    pool_op_kernel_sizes = [[1] * dim]
    conv_kernel_sizes: list[list[int]] = []
    num_pool_per_axis = [0] * dim
    kernel_size = [1] * dim

    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        spacings_of_axes = [current_spacing[i] for i in valid]
        min_spacing_of_valid = min(spacings_of_axes)
        valid = [i for i in valid if current_spacing[i] / min_spacing_of_valid < 2]
        valid = [i for i in valid if num_pool_per_axis[i] < max_numpool]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        # kernels become 3 (and stay 3) once the axis is within a factor 2 of the finest spacing.
        # nnU-Net reads the spacing from the list of size-valid axes indexed by axis number: the
        # same value whenever every axis passed the size test; otherwise it misreads or raises
        # IndexError. We use the axis's own spacing, so such cases plan as the rule intends.
        for d in range(dim):
            if kernel_size[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel_size[d] = 3
        pool = [1] * dim
        for v in valid:
            pool[v] = 2
            num_pool_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = int(np.ceil(current_size[v] / 2))
        pool_op_kernel_sizes.append(pool)
        conv_kernel_sizes.append(list(kernel_size))

    must_be_divisible_by = get_shape_must_be_divisible_by(num_pool_per_axis)
    patch = pad_shape(patch_size, must_be_divisible_by)
    conv_kernel_sizes.append([3] * dim)
    return num_pool_per_axis, pool_op_kernel_sizes, conv_kernel_sizes, patch, must_be_divisible_by
