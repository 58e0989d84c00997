"""Pseudo-label cleaning by connected components, decided from the labelled cases.

A network trained on a few labelled cases predicts scattered false-positive islands far from the
structures (A2D-3: HD95 of 95-130 mm for every method), and a method that trains on its own hard
pseudo-labels learns those islands back. Where the labelled cases show that a class is one
connected structure (its largest connected component holds nearly all of its voxels in every
case or, for a 2d configuration, in every slice), every other component of that class in a
pseudo-label is an error: ``keep_largest_components`` sets it to background, as BCP's ACDC code
does with its pseudo-labels. Where a class comes in several pieces (lesions, vessels cut by the
patch), the labelled cases say so and the class is left alone.

The decision (``single_component_classes``) is made by the trainer from the labelled training
cases' preprocessed segmentations, before the first step, and handed to the methods through
``TrainingContext.single_component_classes``; it is written to the training log.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

#: a class counts as one structure when its largest components hold at least this share of its
#: voxels, summed over the labelled cases (2d: over the slices that contain it)
MIN_LARGEST_SHARE = 0.95


def largest_component_voxels(mask: np.ndarray) -> tuple[int, int]:
    """(voxels of the largest face-connected component, voxels of the mask)."""
    total = int(mask.sum())
    if total == 0:
        return 0, 0
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return total, total
    sizes = np.bincount(labelled.ravel())[1:]
    return int(sizes.max()), total


def single_component_classes(segmentations: Iterable[np.ndarray], classes: Sequence[int], per_slice: bool,
                             min_share: float = MIN_LARGEST_SHARE) -> tuple[int, ...]:
    """Classes whose largest connected component (per case, or per slice along the first
    spatial axis when ``per_slice``) holds at least ``min_share`` of the class's voxels, summed
    over all given segmentations ((1, *spatial) or (*spatial) integer maps)."""
    largest = {c: 0 for c in classes}
    total = {c: 0 for c in classes}
    for seg in segmentations:
        seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        units = seg if per_slice else seg[None]
        for unit in units:
            for c in classes:
                m = unit == c
                if not m.any():
                    continue
                a, b = largest_component_voxels(m)
                largest[c] += a
                total[c] += b
    return tuple(c for c in classes if total[c] > 0 and largest[c] >= min_share * total[c])


def keep_largest_components(labels: torch.Tensor, classes: Sequence[int], background: int = 0) -> torch.Tensor:
    """For each sample of a hard label map (B, 1, *spatial) and each class in ``classes``, keep
    the class's largest connected component and set its other components to ``background``.
    Other values (other classes, an ignore label) are left as they are."""
    if not classes:
        return labels
    arr = labels.detach().cpu().numpy()
    out = arr.copy()
    for b in range(arr.shape[0]):
        for c in classes:
            m = arr[b, 0] == c
            if not m.any():
                continue
            labelled, n = ndimage.label(m)
            if n <= 1:
                continue
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            out[b, 0][m & (labelled != int(sizes.argmax()))] = background
    return torch.from_numpy(out).to(labels.device)
