"""Logits in the preprocessed space -> segmentation (and probabilities) in the raw image geometry.

Steps (nnU-Net v2's ``export_prediction``): resample the logits to the shape after cropping with
the configuration's ``resampling_fn_probabilities`` (order 1 by default) -> probabilities
(softmax, or sigmoid for regions) -> segmentation (argmax, or regions in
``regions_class_order``) -> insert into the full (uncropped) image -> undo the transpose -> write
with the dataset's reader/writer and the geometry the reader stored in ``props`` (spacing,
origin, direction / affine), so the output overlays the input exactly.

``save_probabilities`` also writes ``<case>.npz`` (key ``probabilities``, float32,
(heads, *original shape), transposed back; outside the crop: background 1 for labels, 0 for
regions) and ``<case>.pkl`` (the properties), as nnU-Net. All files are written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice

from autossl.imageio.base import BaseReaderWriter
from autossl.imageio.registry import reader_writer_class
from autossl.preprocessing.resampling import get_resampling_function
from autossl.utilities.file_io import atomic_path, save_pickle
from autossl.utilities.label_handling import LabelManager

DEFAULT_PROBABILITY_RESAMPLING_KWARGS = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}


# ------------------------------------------------------------------ plans accessors
def _plans_dict(plans_manager) -> dict:
    return plans_manager if isinstance(plans_manager, dict) else plans_manager.plans


def _config_dict(configuration_manager) -> dict:
    return configuration_manager if isinstance(configuration_manager, dict) else configuration_manager.configuration


def transpose_forward(plans_manager) -> list[int]:
    v = getattr(plans_manager, "transpose_forward", None)
    return [int(i) for i in (v if v is not None else _plans_dict(plans_manager)["transpose_forward"])]


def transpose_backward(plans_manager) -> list[int]:
    v = getattr(plans_manager, "transpose_backward", None)
    return [int(i) for i in (v if v is not None else _plans_dict(plans_manager)["transpose_backward"])]


def configuration_spacing(configuration_manager) -> list[float]:
    v = getattr(configuration_manager, "spacing", None)
    return [float(s) for s in (v if v is not None else _config_dict(configuration_manager)["spacing"])]


def resampling_fn_probabilities(configuration_manager):
    """``fn(data, new_shape, current_spacing, new_spacing)`` of the configuration."""
    fn = getattr(configuration_manager, "resampling_fn_probabilities", None)
    if callable(fn):
        return fn
    cfg = _config_dict(configuration_manager)
    base = get_resampling_function(cfg.get("resampling_fn_probabilities", "resample_data_or_seg_to_shape"))
    kwargs = dict(cfg.get("resampling_fn_probabilities_kwargs", DEFAULT_PROBABILITY_RESAMPLING_KWARGS))
    return lambda data, new_shape, cur, new: base(data, new_shape, cur, new, **kwargs)


def reader_writer_for(dataset_json: dict, plans_manager=None) -> BaseReaderWriter:
    """The dataset's reader/writer (dataset.json override, else the plans', else by file ending)."""
    name = dataset_json.get("overwrite_image_reader_writer")
    if name is None and plans_manager is not None:
        name = _plans_dict(plans_manager).get("image_reader_writer")
    try:
        return reader_writer_class(dataset_json["file_ending"], name)()
    except ValueError:  # e.g. a reader named in nnU-Net plans that we do not have
        return reader_writer_class(dataset_json["file_ending"])()


# ------------------------------------------------------------------ conversion
def resample_logits_to_cropped_shape(logits: np.ndarray | torch.Tensor, plans_manager, configuration_manager,
                                     properties: dict) -> np.ndarray:
    """Logits (heads, *preprocessed) -> (heads, *shape_after_cropping_and_before_resampling)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    target_shape = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    if tuple(logits.shape[1:]) == target_shape:
        return logits
    spacing_t = [float(properties["spacing"][i]) for i in transpose_forward(plans_manager)]
    cfg_spacing = configuration_spacing(configuration_manager)
    current = cfg_spacing if len(cfg_spacing) == len(target_shape) else [spacing_t[0], *cfg_spacing]
    out = resampling_fn_probabilities(configuration_manager)(logits, target_shape, current, spacing_t)
    return np.asarray(out, dtype=np.float32)


def revert_cropping(arr: np.ndarray, properties: dict, fill_background: bool) -> np.ndarray:
    """Put a cropped array (c, *crop) or (*crop) back into the shape before cropping."""
    shape = tuple(int(s) for s in properties["shape_before_cropping"])
    slicer = bounding_box_to_slice(properties["bbox_used_for_cropping"])
    if arr.ndim == len(shape):
        out = np.zeros(shape, dtype=arr.dtype)
        out[slicer] = arr
        return out
    out = np.zeros((arr.shape[0], *shape), dtype=arr.dtype)
    if fill_background:
        out[0] = 1
    out[(slice(None), *slicer)] = arr
    return out


def convert_predicted_logits_to_segmentation_with_correct_shape(
        logits: np.ndarray | torch.Tensor, plans_manager, configuration_manager, label_manager: LabelManager,
        properties: dict, return_probabilities: bool = False):
    """Segmentation in the original array layout (+ probabilities (heads, *original) when asked)."""
    resampled = resample_logits_to_cropped_shape(logits, plans_manager, configuration_manager, properties)
    probs = label_manager.logits_to_probabilities(torch.from_numpy(resampled))
    del resampled
    seg = label_manager.probabilities_to_segmentation(probs)
    seg = seg.cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
    max_label = max([0, *label_manager.foreground_labels])
    seg = revert_cropping(seg.astype(np.uint8 if max_label < 255 else np.uint16), properties, False)
    tb = transpose_backward(plans_manager)
    seg = np.ascontiguousarray(seg.transpose(tb))
    if not return_probabilities:
        return seg
    probs_np = probs.float().cpu().numpy()
    probs_np = revert_cropping(probs_np, properties, fill_background=not label_manager.has_regions)
    probs_np = np.ascontiguousarray(probs_np.transpose([0, *[i + 1 for i in tb]]))
    return seg, probs_np


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def export_prediction_from_logits(logits: np.ndarray | torch.Tensor, properties: dict, configuration_manager,
                                  plans_manager, dataset_json: dict, output_file_truncated: str | os.PathLike,
                                  save_probabilities: bool = False) -> str:
    """Write ``<output_file_truncated><file_ending>`` (+ ``.npz``/``.pkl``); returns the segmentation path."""
    label_manager = LabelManager.from_dataset_json(dataset_json)
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties, save_probabilities)
    output_file_truncated = str(output_file_truncated)
    Path(output_file_truncated).parent.mkdir(parents=True, exist_ok=True)
    if save_probabilities:
        seg, probs = ret
        save_npz_atomic(output_file_truncated + ".npz", probabilities=probs)
        save_pickle(properties, output_file_truncated + ".pkl")
    else:
        seg = ret
    out = output_file_truncated + dataset_json["file_ending"]
    reader_writer_for(dataset_json, plans_manager).write_seg(seg, out, properties)
    return out
