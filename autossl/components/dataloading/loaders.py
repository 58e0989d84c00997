"""Patch loaders (batchgenerators ``DataLoader`` subclasses, infinite random sampling).

``LabeledDataLoader`` is nnU-Net v2's ``nnUNetDataLoader``: it crops an (enlarged) patch per
sample with acvl's ``crop_and_pad_nd`` (data padded with 0, seg with -1), forces the last
``oversample_foreground_percent`` of each batch to be centred on a random foreground voxel
(``props["class_locations"]``) and runs the bgv2 transforms per sample. 2D configurations read
3D preprocessed volumes with a ``(1, *patch)`` crop, i.e. one slice.

``UnlabeledDataLoader`` crops random patches from ``<data_identifier>_unlabeled`` cases (never a
segmentation). After ``set_pseudo_labels`` its batches carry "target": the pseudo-label crop
(-1 = ignore, also where a case has no pseudo-label and outside the image).

Batches: labelled ``{"data": (B, C, *patch) float32, "target": [(B, 1, *scale_i) int16, ...],
"keys": [...]}``; unlabelled ``{"data", "keys"[, "target"]}``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from threadpoolctl import threadpool_limits

from autossl.components.dataloading.dataset import PreprocessedCases


def _as_pseudo3d(patch_size: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) == 2:
        return (1, *patch_size), True
    return patch_size, False


def _random_bbox(data_shape, patch_size, need_to_pad) -> tuple[list[int], list[int]]:
    need_to_pad = list(need_to_pad)
    dim = len(data_shape)
    for d in range(dim):
        if need_to_pad[d] + data_shape[d] < patch_size[d]:
            need_to_pad[d] = patch_size[d] - data_shape[d]
    lbs = [-need_to_pad[d] // 2 for d in range(dim)]
    ubs = [data_shape[d] + need_to_pad[d] // 2 + need_to_pad[d] % 2 - patch_size[d] for d in range(dim)]
    return lbs, ubs


def _collate(samples: list[dict], key: str):
    first = samples[0][key]
    if isinstance(first, (list, tuple)):
        return [torch.stack([s[key][i] for s in samples]) for i in range(len(first))]
    return torch.stack([s[key] for s in samples])


class _PatchLoader(DataLoader):
    def __init__(self, cases: PreprocessedCases, batch_size: int, patch_size: Sequence[int],
                 final_patch_size: Sequence[int], transforms=None):
        if len(cases) == 0:
            raise ValueError(f"{cases.folder}: no cases to load patches from")
        # data, batch size, 1 thread slot, no shuffle seed, return_incomplete, shuffle, infinite
        super().__init__(cases, batch_size, 1, None, True, False, True)
        self.indices = list(cases.identifiers)
        self.patch_size, self.patch_size_was_2d = _as_pseudo3d(patch_size)
        self.final_patch_size, _ = _as_pseudo3d(final_patch_size)
        self.need_to_pad = (np.array(self.patch_size) - np.array(self.final_patch_size)).astype(int)
        self.transforms = transforms

    def _squeeze(self, arr: torch.Tensor) -> torch.Tensor:
        return arr[:, :, 0] if self.patch_size_was_2d else arr

    def _transform(self, data: torch.Tensor, seg: torch.Tensor | None) -> dict:
        if self.transforms is None:
            return {"image": data, "segmentation": seg} if seg is not None else {"image": data}
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            if seg is None:
                return self.transforms(image=data)
            return self.transforms(image=data, segmentation=seg)


class LabeledDataLoader(_PatchLoader):
    def __init__(self, cases: PreprocessedCases, batch_size: int, patch_size: Sequence[int],
                 final_patch_size: Sequence[int], all_labels: Sequence[int], has_ignore: bool = False,
                 oversample_foreground_percent: float = 0.33, transforms=None):
        super().__init__(cases, batch_size, patch_size, final_patch_size, transforms)
        self.oversample_foreground_percent = oversample_foreground_percent
        self.annotated_classes_key = tuple([-1] + [int(i) for i in all_labels])
        self.has_ignore = has_ignore

    def get_do_oversample(self, sample_idx: int) -> bool:
        """The last ``oversample_foreground_percent`` of the batch must contain foreground."""
        return not sample_idx < round(self.batch_size * (1 - self.oversample_foreground_percent))

    def _annotated_key(self, class_locations: dict):
        """The key of the 'annotated voxels' locations (ignore-label datasets): nnU-Net's
        ``(-1, *all_labels)``, or any tuple key covering every label."""
        if self.annotated_classes_key in class_locations:
            return self.annotated_classes_key
        labels = set(self.annotated_classes_key[1:])
        return next((k for k in class_locations if isinstance(k, tuple) and labels <= set(k)), None)

    def get_bbox(self, data_shape, force_fg: bool, class_locations: dict | None):
        dim = len(data_shape)
        lbs, ubs = _random_bbox(data_shape, self.patch_size, self.need_to_pad)
        selected = None
        ann = self._annotated_key(class_locations) if class_locations else None
        if force_fg and class_locations:
            eligible = [k for k, v in class_locations.items() if len(v) > 0 and k != ann]
            if not eligible and ann is not None and len(class_locations[ann]) > 0:
                eligible = [ann]  # no foreground: at least annotated voxels
            if eligible:
                selected = eligible[np.random.choice(len(eligible))]
        elif not force_fg and self.has_ignore and class_locations:
            if ann is not None and len(class_locations[ann]) > 0:
                selected = ann
            else:
                warnings.warn("no annotated voxels in a case with an ignore label; cropping at random")
        if selected is not None:
            voxels = class_locations[selected]
            voxel = np.asarray(voxels[np.random.choice(len(voxels))])[-dim:]
            bbox_lbs = [max(lbs[i], int(voxel[i]) - self.patch_size[i] // 2) for i in range(dim)]
        else:
            bbox_lbs = [np.random.randint(lbs[i], ubs[i] + 1) for i in range(dim)]
        return bbox_lbs, [bbox_lbs[i] + self.patch_size[i] for i in range(dim)]

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        samples = []
        for j, case in enumerate(keys):
            data, seg, props = self._data.load_case(case)
            lbs, ubs = self.get_bbox(data.shape[1:], self.get_do_oversample(j), props.get("class_locations"))
            bbox = [[a, b] for a, b in zip(lbs, ubs)]
            d = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32))
            s = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(seg, bbox, -1)).astype(np.int16, copy=False))
            if self.patch_size_was_2d:
                d, s = d[:, 0], s[:, 0]
            samples.append(self._transform(d, s))
        return {"data": _collate(samples, "image"), "target": _as_list(_collate(samples, "segmentation")),
                "keys": list(keys)}


def _as_list(t):
    return t if isinstance(t, list) else [t]


class UnlabeledDataLoader(_PatchLoader):
    def __init__(self, cases: PreprocessedCases, batch_size: int, patch_size: Sequence[int],
                 final_patch_size: Sequence[int], transforms=None, pseudo_label_files: dict[str, str] | None = None):
        if cases.labeled:
            raise ValueError("UnlabeledDataLoader needs PreprocessedCases(..., labeled=False)")
        super().__init__(cases, batch_size, patch_size, final_patch_size, transforms)
        self.pseudo_label_files: dict[str, str] = dict(pseudo_label_files or {})

    def set_pseudo_label_files(self, files: dict[str, str | os.PathLike]) -> None:
        """{case: blosc2 ``.b2nd`` file (1, *spatial) int16, -1 = ignore}. Cases without one get all -1."""
        self.pseudo_label_files = {k: str(v) for k, v in files.items()}

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        with_targets = bool(self.pseudo_label_files)
        samples = []
        for case in keys:
            data, _, _ = self._data.load_case(case)
            lbs, ubs = _random_bbox(data.shape[1:], self.patch_size, self.need_to_pad)
            lbs = [np.random.randint(lb, ub + 1) for lb, ub in zip(lbs, ubs)]
            bbox = [[a, a + p] for a, p in zip(lbs, self.patch_size)]
            d = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32))
            s = None
            if with_targets:
                f = self.pseudo_label_files.get(case)
                if f is not None:
                    pl = blosc2.open(f, mode="r", dparams={"nthreads": 1})
                    if tuple(pl.shape[1:]) != tuple(data.shape[1:]):
                        raise ValueError(f"pseudo-label {Path(f).name}: shape {pl.shape[1:]} != case shape "
                                         f"{data.shape[1:]} of {case}")
                    s = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(pl, bbox, -1)).astype(np.int16))
                else:
                    s = torch.full((1, *self.patch_size), -1, dtype=torch.int16)
            if self.patch_size_was_2d:
                d = d[:, 0]
                s = s[:, 0] if s is not None else None
            samples.append(self._transform(d, s))
        out = {"data": _collate(samples, "image"), "keys": list(keys)}
        if with_targets:
            out["target"] = _as_list(_collate(samples, "segmentation"))
        return out
