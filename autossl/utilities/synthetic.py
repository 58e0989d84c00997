"""Small synthetic datasets in the raw format: labelled, unlabelled and test cases.

``kind="simple"`` (the tests): each image holds two adjacent ellipsoids (labels 1 and 2, like a
hippocampus head and tail) of random size, position and contrast on a noisy background with a
smooth bias field, so that a network must learn shape and context rather than a threshold.

``kind="varied"`` (the demo): the same two-part structure, but cases vary far more than a few
labelled ones can cover: one or two structures per image, anywhere in the field of view,
elongated and tilted in any direction, at contrasts from faint to strong on backgrounds of
different brightness, noise and bias, next to unlabelled distractor blobs of the same intensity
that only the two-part shape tells apart. A handful of labels does not span this, and the many
unlabelled cases do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from autossl.utilities.file_io import save_json


def _case(rng: np.random.Generator, shape, two_d: bool):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    center = rng.uniform(-0.25, 0.25, len(shape))
    radii = rng.uniform(0.3, 0.5, len(shape))
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    seg = np.zeros(shape, np.uint8)
    inside = d < 1
    axis = grids[-1] - center[-1]
    seg[inside & (axis < 0)] = 1
    seg[inside & (axis >= 0)] = 2
    bias = 1 + 0.3 * sum(rng.uniform(-1, 1) * g for g in grids)
    contrast = rng.uniform(0.6, 1.0)
    img = 100 + bias * 40 * (seg == 1) * contrast + bias * 70 * (seg == 2) * contrast
    img = img + rng.normal(0, 12, shape)
    img[d > 3.5] *= 0.0 if not two_d else 1.0  # zero border like skull-stripped MRI (crop test)
    return img.astype(np.float32), seg


def _varied_case(rng: np.random.Generator, shape, two_d: bool):
    n = len(shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    seg = np.zeros(shape, np.uint8)
    background = rng.uniform(60, 140)
    contrast = rng.uniform(0.6, 1.0)
    img = np.full(shape, background, np.float64)
    occupied = np.zeros(shape, bool)

    def ellipsoid(center, radii, rotation):
        coords = [g - c for g, c in zip(grids, center)]
        rot = [sum(rotation[i][j] * coords[j] for j in range(n)) for i in range(n)]
        return sum((r_ / a) ** 2 for r_, a in zip(rot, radii)), rot

    def random_rotation():
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return q

    for _ in range(int(rng.integers(1, 3))):  # structures: two parts each
        for _attempt in range(10):
            center = rng.uniform(-0.6, 0.6, n)
            radii = rng.uniform(0.18, 0.36, n)
            radii[-1] *= rng.uniform(1.2, 1.6)  # elongated along its own last axis
            d, rot = ellipsoid(center, radii, random_rotation())
            inside = d < 1
            if inside.sum() > 8 and not (inside & occupied).any():
                break
        else:
            continue
        occupied |= d < 1.6
        head = inside & (rot[-1] < 0)
        tail = inside & (rot[-1] >= 0)
        seg[head], seg[tail] = 1, 2
        img[head] += 60 * contrast
        img[tail] += 100 * contrast
    for _ in range(int(rng.integers(0, 3))):  # distractors: one-part blobs, not labelled
        for _attempt in range(10):
            d, _ = ellipsoid(rng.uniform(-0.7, 0.7, n), rng.uniform(0.08, 0.2, n), random_rotation())
            if (d < 1).sum() > 4 and not (d < 1.3)[occupied].any():
                img[d < 1] += float(rng.choice([60.0, 100.0])) * contrast
                occupied |= d < 1.3
                break
    bias = 1 + rng.uniform(0.1, 0.45) * sum(rng.uniform(-1, 1) * g for g in grids)
    img = img * bias + rng.normal(0, rng.uniform(5, 16), shape)
    return img.astype(np.float32), seg


def make_synthetic_dataset(raw_root: str | Path, dataset_id: int = 999, name: str = "Synthetic", *,
                           two_d: bool = False, n_labeled: int = 6, n_unlabeled: int = 8, n_test: int = 3,
                           shape=(24, 32, 28), spacing=(1.5, 1.0, 1.0), seed: int = 0,
                           file_ending: str | None = None, test_labels_dir: str | Path | None = None,
                           kind: str = "simple") -> Path:
    """Write ``Dataset{id}_{name}`` under ``raw_root``; returns its folder.

    ``kind``: "simple" or "varied" (see the module doc).
    Test labels go to ``test_labels_dir`` (outside the raw dataset) when given.
    2D datasets are PNG files (shape is the 2D shape)."""
    if kind not in ("simple", "varied"):
        raise ValueError(f"synthetic dataset kind must be 'simple' or 'varied', got {kind!r}")
    make_case = _case if kind == "simple" else _varied_case
    rng = np.random.default_rng(seed)
    file_ending = file_ending or (".png" if two_d else ".nii.gz")
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTrUnlabeled", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if test_labels_dir is not None:
        Path(test_labels_dir).mkdir(parents=True, exist_ok=True)

    def write(arr, path, is_seg):
        if two_d:
            a = arr if is_seg else np.clip(arr, 0, 255)
            Image.fromarray(a.astype(np.uint8)).save(path)
        else:
            itk = sitk.GetImageFromArray(arr if not is_seg else arr.astype(np.uint8))
            itk.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            itk.SetOrigin((3.0, -7.0, 11.0))
            sitk.WriteImage(itk, str(path), True)

    shape = tuple(shape[-2:]) if two_d else tuple(shape)
    groups = [("imagesTr", n_labeled, "lab"), ("imagesTrUnlabeled", n_unlabeled, "unl"), ("imagesTs", n_test, "test")]
    for sub, n, prefix in groups:
        for i in range(n):
            img, seg = make_case(rng, shape, two_d)
            case = f"{name.lower()}_{prefix}{i:03d}"
            write(img, folder / sub / f"{case}_0000{file_ending}", False)
            if sub == "imagesTr":
                write(seg, folder / "labelsTr" / f"{case}{file_ending}", True)
            elif sub == "imagesTs" and test_labels_dir is not None:
                write(seg, Path(test_labels_dir) / f"{case}{file_ending}", True)
    save_json({
        "channel_names": {"0": "MRI" if not two_d else "gray"},
        "labels": {"background": 0, "head": 1, "tail": 2},
        "numTraining": n_labeled,
        "numUnlabeled": n_unlabeled,
        "file_ending": file_ending,
        "name": name,
    }, folder / "dataset.json")
    return folder
