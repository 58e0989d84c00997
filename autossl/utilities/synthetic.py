"""Small synthetic datasets in the raw format: labelled, unlabelled and test cases.

Each image holds two adjacent ellipsoids (labels 1 and 2, like a hippocampus head and tail) of
random size, position and contrast on a noisy background with a smooth bias field, so that a
network must learn shape and context rather than a threshold. Used by the tests and the demo.
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


def make_synthetic_dataset(raw_root: str | Path, dataset_id: int = 999, name: str = "Synthetic", *,
                           two_d: bool = False, n_labeled: int = 6, n_unlabeled: int = 8, n_test: int = 3,
                           shape=(24, 32, 28), spacing=(1.5, 1.0, 1.0), seed: int = 0,
                           file_ending: str | None = None, test_labels_dir: str | Path | None = None) -> Path:
    """Write ``Dataset{id}_{name}`` under ``raw_root``; returns its folder.

    Test labels go to ``test_labels_dir`` (outside the raw dataset) when given.
    2D datasets are PNG files (shape is the 2D shape)."""
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
            img, seg = _case(rng, shape, two_d)
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
