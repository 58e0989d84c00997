"""Resampling of images and segmentations, as nnU-Net v2's ``default_resampling``.

Data: skimage ``resize`` (order 3, edge mode, no anti-aliasing, clipped to the input range).
Segmentations: one-hot ``batchgenerators.augmentations.utils.resize_segmentation`` (order 1 in
the plans). Anisotropic data (max/min spacing > 3) is resampled in-plane with ``order`` and along
the low-resolution axis with ``order_z`` (nearest neighbour by default).

Differences from nnU-Net that do not change results: nothing is computed when the shape does
not change; float32 data is not widened to float64 first (scipy's spline filter works in
float64 either way); the separate-z path handles the low-resolution axis at any position (nnU-Net
allocates its buffer as if it were axis 0); nearest-neighbour resampling along z indexes
directly instead of interpolating the whole volume. Heavy imports are deferred to first use so
that worker processes stay light.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ANISO_THRESHOLD = 3.0

Spacing = Sequence[float] | np.ndarray
Shape = Sequence[int] | np.ndarray


def compute_new_shape(old_shape: Shape, old_spacing: Spacing, new_spacing: Spacing) -> np.ndarray:
    """Shape after resampling ``old_shape`` from ``old_spacing`` to ``new_spacing`` (rounded)."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {tuple(old_shape)}, spacing {tuple(old_spacing)} and target spacing "
                         f"{tuple(new_spacing)} must have the same length")
    return np.array([int(round(sp / nsp * s)) for sp, nsp, s in zip(old_spacing, new_spacing, old_shape)])


def get_do_separate_z(spacing: Spacing, anisotropy_threshold: float = ANISO_THRESHOLD) -> bool:
    return bool((np.max(spacing) / np.min(spacing)) > anisotropy_threshold)


def get_lowres_axis(spacing: Spacing) -> np.ndarray:
    return np.where(max(spacing) / np.asarray(spacing, dtype=float) == 1)[0]


def determine_do_sep_z_and_axis(force_separate_z: bool | None, current_spacing: Spacing, new_spacing: Spacing,
                                separate_z_anisotropy_threshold: float = ANISO_THRESHOLD
                                ) -> tuple[bool, int | None]:
    """nnU-Net's rule: separate z when either spacing is anisotropic and exactly one axis is coarsest."""
    if force_separate_z is not None:
        do_separate_z = bool(force_separate_z)
        axis = get_lowres_axis(current_spacing) if force_separate_z else None
    elif get_do_separate_z(current_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axis = True, get_lowres_axis(current_spacing)
    elif get_do_separate_z(new_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axis = True, get_lowres_axis(new_spacing)
    else:
        do_separate_z, axis = False, None
    if axis is not None and len(axis) != 1:  # all axes equal, or two equally coarse axes
        do_separate_z = False
    if not do_separate_z:
        return False, None
    return True, int(axis[0])


def _resize_data(img: np.ndarray, new_shape, order: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, tuple(int(s) for s in new_shape), order, mode="edge", anti_aliasing=False)


def _resize_seg(seg: np.ndarray, new_shape, order: int) -> np.ndarray:
    from batchgenerators.augmentations.utils import resize_segmentation

    return resize_segmentation(seg, tuple(int(s) for s in new_shape), order)


def _grid_coords(n_in: int, n_out: int) -> np.ndarray:
    """skimage's pixel-centre mapping of output to input coordinates along one axis."""
    return (float(n_in) / n_out) * (np.arange(n_out) + 0.5) - 0.5


def _resample_along_axis(vol: np.ndarray, axis: int, n_out: int, order: int, is_seg: bool) -> np.ndarray:
    """Resample one axis of a 3D volume like ``map_coordinates(..., mode='nearest')`` with identity
    coordinates on the other axes."""
    n_in = vol.shape[axis]
    coords = _grid_coords(n_in, n_out)
    if order == 0:
        # scipy's order-0 spline picks floor(x + 0.5); mode 'nearest' clamps to the edge
        idx = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, n_in - 1)
        return np.take(vol, idx, axis=axis)
    from scipy.ndimage import map_coordinates

    moved = np.moveaxis(vol, axis, 0)
    grid = np.meshgrid(coords, *[np.arange(s, dtype=float) for s in moved.shape[1:]], indexing="ij")
    if not is_seg:
        out = map_coordinates(moved.astype(float, copy=False), np.array(grid), order=order, mode="nearest")
    else:
        out = np.zeros((n_out, *moved.shape[1:]), dtype=vol.dtype)
        for label in np.unique(moved):
            soft = map_coordinates((moved == label).astype(float), np.array(grid), order=order, mode="nearest")
            out[np.round(soft) > 0.5] = label
    return np.moveaxis(out, 0, axis)


def resample_data_or_seg(data: np.ndarray, new_shape: Shape, is_seg: bool = False, axis: int | None = None,
                         order: int = 3, do_separate_z: bool = False, order_z: int = 0,
                         dtype_out=None) -> np.ndarray:
    """Resample ``data`` (c, x, y, z) to ``new_shape`` (x, y, z); see the module docstring."""
    if data.ndim != 4:
        raise ValueError(f"data must be (c, x, y, z), got shape {data.shape}")
    new_shape = np.asarray(new_shape, dtype=int)
    if len(new_shape) != 3:
        raise ValueError(f"new_shape must have 3 entries, got {tuple(new_shape)}")
    dtype_out = np.dtype(dtype_out) if dtype_out is not None else data.dtype
    shape = np.array(data.shape[1:])
    if np.all(shape == new_shape):
        return data if data.dtype == dtype_out else data.astype(dtype_out)
    if data.size == 0:
        return np.zeros((data.shape[0], *new_shape), dtype=dtype_out)

    if is_seg:
        resize_fn = _resize_seg
    else:
        resize_fn = _resize_data
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
    out = np.empty((data.shape[0], *new_shape), dtype=dtype_out)
    for c in range(data.shape[0]):
        if do_separate_z:
            if axis is None:
                raise ValueError("do_separate_z needs the low-resolution axis")
            inplane_shape = tuple(int(s) for i, s in enumerate(new_shape) if i != axis)
            chan = np.moveaxis(data[c], axis, 0)  # slices first
            if tuple(chan.shape[1:]) != inplane_shape:
                slices = np.empty((chan.shape[0], *inplane_shape), dtype=np.float64 if not is_seg else chan.dtype)
                for s in range(chan.shape[0]):
                    slices[s] = resize_fn(chan[s], inplane_shape, order)
            else:
                slices = chan
            vol = np.moveaxis(slices, 0, axis)
            if vol.shape[axis] != new_shape[axis]:
                vol = _resample_along_axis(vol, axis, int(new_shape[axis]), order_z, is_seg)
            out[c] = vol
        else:
            out[c] = resize_fn(data[c], new_shape, order)
    return out


def resample_data_or_seg_to_shape(data: np.ndarray, new_shape: Shape, current_spacing: Spacing,
                                  new_spacing: Spacing, is_seg: bool = False, order: int = 3, order_z: int = 0,
                                  force_separate_z: bool | None = None,
                                  separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """Resample ``data`` (c, x, y, z) to ``new_shape``; the spacings decide about separate z."""
    if np.array_equal(np.asarray(data.shape[1:]), np.asarray(new_shape)):
        return data
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                      separate_z_anisotropy_threshold)
    return resample_data_or_seg(data, new_shape, is_seg, axis, order, do_separate_z, order_z=order_z)


def resample_data_or_seg_to_spacing(data: np.ndarray, current_spacing: Spacing, new_spacing: Spacing,
                                    is_seg: bool = False, order: int = 3, order_z: int = 0,
                                    force_separate_z: bool | None = None,
                                    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """Resample ``data`` (c, x, y, z) from ``current_spacing`` to ``new_spacing``."""
    if data.ndim != 4:
        raise ValueError(f"data must be (c, x, y, z), got shape {data.shape}")
    new_shape = compute_new_shape(data.shape[1:], current_spacing, new_spacing)
    return resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg, order, order_z,
                                         force_separate_z, separate_z_anisotropy_threshold)


RESAMPLING_FUNCTIONS = {
    "resample_data_or_seg_to_shape": resample_data_or_seg_to_shape,
    "resample_data_or_seg_to_spacing": resample_data_or_seg_to_spacing,
}


def get_resampling_function(name: str):
    """Look a resampling function up by the name stored in the plans."""
    if name not in RESAMPLING_FUNCTIONS:
        raise ValueError(f"unknown resampling function {name!r}; known: {sorted(RESAMPLING_FUNCTIONS)}")
    return RESAMPLING_FUNCTIONS[name]
