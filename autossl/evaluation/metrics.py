"""Overlap and surface-distance metrics for one label (or region) of one case.

Overlap (nnU-Net v2's definitions): TP, FP, FN, TN voxel counts outside the ignore mask,
Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), both NaN when reference and prediction
are empty; n_pred = TP + FP, n_ref = TP + FN.

Surface distances, in mm (the voxel spacing goes into the Euclidean distance transform):

* the surface of a mask is the mask minus its erosion with the face-connected structuring
  element (``scipy.ndimage.generate_binary_structure(ndim, 1)``); voxels on the image border
  count as surface (the outside is background), as in MedPy and MONAI;
* a directed distance set d(A->B) holds, for every surface voxel of A, the distance to the
  nearest surface voxel of B;
* HD95 = max(P95(d(P->R)), P95(d(R->P))), the maximum of the two directed 95th percentiles
  (MONAI's ``compute_hausdorff_distance(percentile=95)``; MedPy's ``hd95`` instead takes the
  95th percentile of both sets pooled, which can differ slightly);
* ASD (average symmetric surface distance) = (sum d(P->R) + sum d(R->P)) / (|S_P| + |S_R|),
  the mean over both directed sets pooled (MONAI's symmetric ASD; MedPy's ``assd`` averages the
  two directed means instead, equal when both surfaces have the same number of voxels);
* both are NaN when the reference or the prediction is empty (undefined distance).

Ignore-label voxels are removed from both masks before any metric is computed. Arrays whose
first axis has size 1 (2D images stored as (1, x, y)) are measured in 2D with the in-plane
spacing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

OVERLAP_KEYS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
DISTANCE_KEYS = ("HD95", "ASD")
METRIC_KEYS = OVERLAP_KEYS + DISTANCE_KEYS


def region_or_label_to_mask(seg: np.ndarray, label_or_region: int | Sequence[int]) -> np.ndarray:
    if np.isscalar(label_or_region):
        return seg == label_or_region
    return np.isin(seg, np.asarray(label_or_region))


def compute_tp_fp_fn_tn(mask_ref: np.ndarray, mask_pred: np.ndarray,
                        ignore_mask: np.ndarray | None = None) -> tuple[int, int, int, int]:
    use = np.ones_like(mask_ref, dtype=bool) if ignore_mask is None else ~ignore_mask
    tp = int(np.count_nonzero(mask_ref & mask_pred & use))
    fp = int(np.count_nonzero(~mask_ref & mask_pred & use))
    fn = int(np.count_nonzero(mask_ref & ~mask_pred & use))
    tn = int(np.count_nonzero(~mask_ref & ~mask_pred & use))
    return tp, fp, fn, tn


def _squeeze_singleton(mask_a: np.ndarray, mask_b: np.ndarray, spacing: Sequence[float]):
    keep = [i for i, s in enumerate(mask_a.shape) if s > 1]
    if len(keep) == mask_a.ndim or not keep:
        return mask_a, mask_b, np.asarray(spacing, dtype=float)
    shape = tuple(mask_a.shape[i] for i in keep)
    return mask_a.reshape(shape), mask_b.reshape(shape), np.asarray([spacing[i] for i in keep], dtype=float)


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Mask minus its face-connected erosion (image border voxels are surface)."""
    eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def directed_surface_distances(mask_ref: np.ndarray, mask_pred: np.ndarray,
                               spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(d(pred->ref), d(ref->pred)) in the units of ``spacing``; both masks must be non-empty."""
    mask_ref, mask_pred, spacing = _squeeze_singleton(mask_ref.astype(bool), mask_pred.astype(bool), spacing)
    if len(spacing) != mask_ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {mask_ref.ndim}D mask")
    # crop to the union's bounding box (+1 voxel, clipped to the image): surfaces and the
    # distances between them do not change, the transforms get much cheaper
    coords = np.nonzero(mask_ref | mask_pred)
    box = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, s)) for c, s in zip(coords, mask_ref.shape))
    ref, pred = mask_ref[box], mask_pred[box]
    # outside the crop everything is background, as the erosion's border_value assumes
    s_ref, s_pred = surface_mask(ref), surface_mask(pred)
    dt_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    return dt_ref[s_pred], dt_pred[s_ref]


def hd95_and_asd(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """HD95 and ASD (see the module docstring); NaN when either mask is empty."""
    if not mask_ref.any() or not mask_pred.any():
        return float("nan"), float("nan")
    d_pr, d_rp = directed_surface_distances(mask_ref, mask_pred, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    asd = float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    return hd95, asd


def compute_label_metrics(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float] | None,
                          ignore_mask: np.ndarray | None = None, distances: bool = True) -> dict:
    """All metrics of one label/region (keys ``METRIC_KEYS``; distances only when asked)."""
    if ignore_mask is not None:
        mask_ref = mask_ref & ~ignore_mask
        mask_pred = mask_pred & ~ignore_mask
    tp, fp, fn, tn = compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore_mask)
    denom = tp + fp + fn
    out = {
        "Dice": 2 * tp / (2 * tp + fp + fn) if denom > 0 else float("nan"),
        "IoU": tp / denom if denom > 0 else float("nan"),
        "FP": fp, "TP": tp, "FN": fn, "TN": tn,
        "n_pred": fp + tp, "n_ref": fn + tp,
    }
    if distances:
        if spacing is None:
            raise ValueError("surface distances need the voxel spacing")
        out["HD95"], out["ASD"] = hd95_and_asd(mask_ref, mask_pred, spacing)
    return out
