"""Crop an image to the bounding box of its nonzero region (nnU-Net v2's ``crop_to_nonzero``).

The mask is the union of nonzero voxels over all channels with holes filled. Inside the crop,
background voxels of the segmentation that lie outside the mask get ``nonzero_label`` (-1), so
that normalisation with ``use_mask_for_norm`` and the trainer can tell "outside the body" from
labelled background. Without a segmentation, the returned one is 0 inside and -1 outside.
Bounding boxes are half open, ``[[start, end), ...]`` per spatial axis (acvl_utils convention).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def create_nonzero_mask(data: np.ndarray) -> np.ndarray:
    """``data`` (c, x, y[, z]) -> boolean mask (x, y[, z]) of voxels nonzero in any channel, holes filled."""
    if data.ndim not in (3, 4):
        raise ValueError(f"data must have shape (c, x, y, z) or (c, x, y), got {data.shape}")
    mask = np.zeros(data.shape[1:], dtype=bool)
    for c in range(data.shape[0]):
        mask |= data[c] != 0
    return binary_fill_holes(mask)


def _bbox(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box of ``mask``, the whole extent for an empty mask (as acvl_utils'
    ``get_bbox_from_mask``, whose module imports torch: kept out so that preprocessing stays light)."""
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(idx[0]), int(idx[-1]) + 1] if idx.size else [0, mask.shape[axis]])
    return bbox


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None, nonzero_label: int = -1):
    """Return ``(data_cropped, seg_cropped, bbox)``; ``seg`` is (1, ...) with ``data``'s spatial shape.

    A signed or float ``seg`` is cropped as a view and edited in place (as nnU-Net does); an
    unsigned one (uint8 label files) is converted to int16 first so that it can hold -1."""
    if seg is not None and tuple(seg.shape[1:]) != tuple(data.shape[1:]):
        raise ValueError(f"segmentation shape {seg.shape[1:]} differs from image shape {data.shape[1:]}")
    nonzero_mask = create_nonzero_mask(data)
    bbox = _bbox(nonzero_mask)
    slicer = tuple(slice(a, b) for a, b in bbox)
    data = data[(slice(None), *slicer)]
    nonzero_mask = nonzero_mask[slicer][None]
    if seg is not None:
        seg = seg[(slice(None), *slicer)]
        if seg.dtype.kind in "ub":  # unsigned label files cannot hold -1
            seg = seg.astype(np.int16)
        seg[(seg == 0) & (~nonzero_mask)] = nonzero_label
    else:
        seg = np.where(nonzero_mask, 0, nonzero_label).astype(np.int8)
    return data, seg, bbox
