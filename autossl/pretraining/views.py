"""Views for pre-training: every preprocessed image the user has (the labelled cases' images,
never their segmentations, and the unlabelled cases; imagesTs is never preprocessed), two or
more views per sample.

Per sample a case is drawn, a context region (the enlarged initial patch plus a quarter of the
patch on each side) is cropped at random, and each view takes its own random crop of the
initial patch size inside it (so the views overlap partly, as SimCLR's crops do), then runs its
own draw of ``view_transforms``: nnU-Net's spatial transform (rotation, scaling; here p 0.5
each), intensity transforms at higher probabilities than the labelled pipeline (the colour
jitter of the papers: brightness, contrast, gamma, noise, blur) and mirroring. 2D
configurations crop one slice (as the training loaders do).

Batches: ``{"views": [(B, C, *patch) float32, ...], "keys": [...], "indices": (B,) int64}``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from threadpoolctl import threadpool_limits

from autossl.components.augmentation.pipelines import AugmentationGeometry
from autossl.components.dataloading.loaders import _as_pseudo3d, _random_bbox
from autossl.preprocessing import storage


def view_transforms(patch_size: Sequence[int], geometry: AugmentationGeometry):
    patch_spatial = tuple(int(p) for p in patch_size)
    t = []
    if geometry.dummy_2d:
        t.append(Convert3DTo2DTransform())
        patch_spatial = patch_spatial[1:]
    t.append(SpatialTransform(patch_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                              p_rotation=0.5, rotation=geometry.rotation, p_scaling=0.5, scaling=(0.7, 1.4),
                              p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False))
    if geometry.dummy_2d:
        t.append(Convert2DTo3DTransform())
    t += [
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.6, 1.4)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.8),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.6, 1.4)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.8),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.2),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.5), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.3),
    ]
    if geometry.mirror_axes:
        t.append(MirrorTransform(allowed_axes=geometry.mirror_axes))
    return ComposeTransforms(t)


class ImageCases:
    """The images of the labelled folder and of its ``_unlabeled`` sibling, as one list
    (segmentations are never opened)."""

    def __init__(self, labelled_folder):
        self.sources: list[tuple[str, str]] = []
        for folder in (labelled_folder, storage.unlabeled_folder(labelled_folder)):
            if folder.is_dir():
                self.sources += [(str(folder), c) for c in storage.list_cases(folder)]
        if not self.sources:
            raise FileNotFoundError(f"{labelled_folder}: no preprocessed images to pre-train on")

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, i: int):
        folder, case = self.sources[i]
        data, _, _ = storage.load_case(folder, case, mmap=True, load_seg=False)
        return data


class ViewLoader(DataLoader):
    def __init__(self, cases: ImageCases, batch_size: int, patch_size: Sequence[int], geometry: AugmentationGeometry,
                 num_views: int = 2):
        super().__init__(cases, batch_size, 1, None, True, False, True)
        self.indices = list(range(len(cases)))
        self.final_patch_size, self.was_2d = _as_pseudo3d(patch_size)
        self.initial, _ = _as_pseudo3d(geometry.initial_patch_size)
        margin = [0 if (self.was_2d and d == 0) else p // 4 for d, p in enumerate(self.final_patch_size)]
        self.margin = np.asarray(margin)
        self.context = tuple(int(i + 2 * m) for i, m in zip(self.initial, margin))
        self.num_views = int(num_views)
        self.transforms = view_transforms(patch_size, geometry)

    def generate_train_batch(self) -> dict:
        idx = self.get_indices()
        views: list[list[torch.Tensor]] = [[] for _ in range(self.num_views)]
        for i in idx:
            data = self._data.load(i)
            lbs, ubs = _random_bbox(data.shape[1:], self.context, np.zeros(len(self.context), int))
            lo = [np.random.randint(a, b + 1) for a, b in zip(lbs, ubs)]
            region = torch.from_numpy(np.ascontiguousarray(
                crop_and_pad_nd(data, [[a, a + c] for a, c in zip(lo, self.context)], 0), dtype=np.float32))
            for v in range(self.num_views):
                off = [np.random.randint(0, 2 * m + 1) for m in self.margin]
                sl = (slice(None),) + tuple(slice(o, o + p) for o, p in zip(off, self.initial))
                crop = region[sl]
                if self.was_2d:
                    crop = crop[:, 0]
                with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
                    views[v].append(self.transforms(image=crop.contiguous())["image"])
        return {"views": [torch.stack(v) for v in views], "keys": [self._data.sources[i][1] for i in idx],
                "indices": torch.as_tensor(list(idx), dtype=torch.long)}
