"""Pseudo-label cleaning by connected components, decided from the labelled cases.

A network trained on a few labelled cases predicts scattered false-positive islands far from the
structures (A2D-3: HD95 of 95-130 mm for every method), and a method that trains on its own hard
pseudo-labels learns those islands back. Where the labelled cases show that a class is one
connected structure (its largest connected component holds nearly all of its voxels in every
case or, for a 2d configuration, in every slice), every other component of that class in a
pseudo-label is an error: ``keep_largest_components`` sets it to background, as BCP's ACDC code
does with its pseudo-labels. Where a class comes in several pieces (lesions, vessels cut by the
patch), the labelled cases say so and the class is left alone.

Where the labelled cases show the whole foreground to be one structure as well (the heart: its
ventricles and myocardium touch), the union of the classes is cleaned first, so that a stray
piece of a class that does not touch the main structure goes even where it is larger than the
class's true piece (a small right ventricle on a basal slice, a large false one on fluid away
from the heart), as the largest-component postprocessing does.

The decision (``single_structure``) is made by the trainer from the labelled training
cases' preprocessed segmentations, before the first step, and handed to the methods through
``TrainingContext.single_component_classes`` and ``single_component_foreground``; it is written
to the training log.
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


def _largest_share(segmentations: Iterable[np.ndarray], groups: Sequence[Sequence[int]],
                   per_slice: bool) -> list[tuple[int, int]]:
    """For each group of classes: (voxels in the largest component of the group's union, voxels
    of the union), summed over the segmentations (per slice along the first spatial axis when
    ``per_slice``)."""
    sums = [[0, 0] for _ in groups]
    for seg in segmentations:
        seg = np.asarray(seg)
        if seg.ndim == 4:
            seg = seg[0]
        units = seg if per_slice else seg[None]
        for unit in units:
            for i, group in enumerate(groups):
                m = np.isin(unit, group)
                if not m.any():
                    continue
                a, b = largest_component_voxels(m)
                sums[i][0] += a
                sums[i][1] += b
    return [(a, b) for a, b in sums]


def single_component_classes(segmentations: Iterable[np.ndarray], classes: Sequence[int], per_slice: bool,
                             min_share: float = MIN_LARGEST_SHARE) -> tuple[int, ...]:
    """Classes whose largest connected component (per case, or per slice along the first
    spatial axis when ``per_slice``) holds at least ``min_share`` of the class's voxels, summed
    over all given segmentations ((1, *spatial) or (*spatial) integer maps)."""
    return single_structure(segmentations, classes, per_slice, min_share)[0]


def single_structure(segmentations: Iterable[np.ndarray], classes: Sequence[int], per_slice: bool,
                     min_share: float = MIN_LARGEST_SHARE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the classes that are one structure each, as ``single_component_classes``; ``classes``
    when their union, the whole foreground, is one structure too, else ()) in one pass over the
    segmentations. A foreground that is one structure (a heart: ventricles and myocardium touch)
    lets cleaning drop a stray piece of any class that does not touch it, even where that piece is
    larger than the class's true piece (a small right ventricle on a basal slice)."""
    classes = tuple(classes)
    shares = _largest_share(segmentations, [(c,) for c in classes] + [classes], per_slice)
    single = tuple(c for c, (a, b) in zip(classes, shares) if b > 0 and a >= min_share * b)
    a, b = shares[-1]
    return single, (classes if len(classes) > 1 and b > 0 and a >= min_share * b else ())


def keep_largest_components(labels: torch.Tensor, classes: Sequence[int], background: int = 0,
                            foreground: Sequence[int] = ()) -> torch.Tensor:
    """For each sample of a hard label map (B, 1, *spatial): with ``foreground`` (a set of
    classes), first keep the largest connected component of their union and set the voxels of
    its other components to ``background``; then, for each class in ``classes``, keep the class's
    largest connected component and set its other components to ``background``. Other values
    (other classes, an ignore label) are left as they are."""
    if not classes and not foreground:
        return labels
    arr = labels.detach().cpu().numpy()
    out = arr.copy()
    groups = ([tuple(foreground)] if foreground else []) + [(c,) for c in classes]
    for b in range(arr.shape[0]):
        for group in groups:
            m = np.isin(out[b, 0], group)
            if not m.any():
                continue
            labelled, n = ndimage.label(m)
            if n <= 1:
                continue
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            out[b, 0][m & (labelled != int(sizes.argmax()))] = background
    return torch.from_numpy(out).to(labels.device)
