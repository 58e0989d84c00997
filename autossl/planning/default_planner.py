"""Experiment planning with nnU-Net v2's rules (``ExperimentPlanner``), plus a transformer entry.

From the dataset fingerprint and dataset.json this decides, per configuration (2d, 3d_fullres,
3d_lowres + 3d_cascade_fullres): target spacing, transpose, normalisation, patch and batch size,
the PlainConvUNet topology, resampling functions and batch dice; the result is written as
``$autossl_preprocessed/DatasetXXX_Name/<plans_name>.json`` in nnU-Net's plans structure.

Differences from nnU-Net, all for semi-supervised data:
- the batch-size cap (at most 5% of the dataset's voxels per step) counts labelled AND
  unlabelled training cases, since both are sampled in training;
- every configuration also has ``transformer_architecture`` (see ``transformer.py``) and
  ``hybrid_architecture`` (Semiformer: the two joined, built from references to both entries;
  ``networks.entries.hybrid_architecture``).
"""
from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path
from typing import Sequence

import numpy as np

from autossl import paths
from autossl.planning.topology import get_pool_and_conv_props
from autossl.networks.entries import hybrid_architecture
from autossl.planning.transformer import transformer_architecture
from autossl.preprocessing.normalization import get_normalization_class, normalization_scheme_for_channel
from autossl.utilities.file_io import atomic_path, load_json, save_json

ANISO_THRESHOLD = 3
RESAMPLING_FN = "resample_data_or_seg_to_shape"


def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float],
                      new_spacing: Sequence[float]) -> np.ndarray:
    """Shape after resampling from ``old_spacing`` to ``new_spacing`` (nnU-Net's rounding)."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {old_shape}, spacing {old_spacing} and new spacing {new_spacing} differ in length")
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def plain_conv_unet_feature_map_size(patch_size: Sequence[int], arch_kwargs: dict, num_classes: int,
                                     deep_supervision: bool = False) -> int:
    """``PlainConvUNet(**arch_kwargs).compute_conv_feature_map_size(patch_size)`` computed directly
    (dynamic-network-architectures 0.4.x arithmetic; strided-conv pooling, as planned)."""
    n = int(arch_kwargs["n_stages"])
    dim = len(patch_size)

    def per_stage(v, count):
        return list(v) if isinstance(v, (list, tuple)) else [v] * count

    feats = per_stage(arch_kwargs["features_per_stage"], n)
    strides = [per_stage(s, dim) for s in per_stage(arch_kwargs["strides"], n)]
    n_conv = per_stage(arch_kwargs["n_conv_per_stage"], n)
    n_conv_dec = per_stage(arch_kwargs["n_conv_per_stage_decoder"], n - 1)
    size = [int(p) for p in patch_size]
    total, skips = 0, []
    for s in range(n):  # encoder: every conv of a stage outputs features[s] x (size // stride)
        size = [i // int(j) for i, j in zip(size, strides[s])]
        total += int(n_conv[s]) * int(feats[s]) * int(np.prod(size, dtype=np.int64))
        if s < n - 1:
            skips.append(size)
    for s in range(n - 1):  # decoder: convs + transposed conv (+ segmentation output)
        vox = int(np.prod(skips[-(s + 1)], dtype=np.int64))
        f = int(feats[-(s + 2)])
        total += int(n_conv_dec[s]) * f * vox + f * vox
        if deep_supervision or s == n - 2:
            total += int(num_classes) * vox
    return total


def _json_value(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _to_json_types(obj):
    """Plain lists / ints / floats only (numpy values and tuples converted), as they will be on disk."""
    return json.loads(json.dumps(obj, default=_json_value))


class ExperimentPlanner:
    """nnU-Net v2's default planner. Class attributes are the knobs subclasses (``CPUPlanner``) turn."""

    default_plans_name = "autosslPlans"

    UNet_class_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    UNet_base_num_features = 32
    UNet_max_features_2d = 512
    UNet_max_features_3d = 320
    UNet_reference_val_3d = 560_000_000  # nnU-Net's reference feature-map sizes for 8 GB
    UNet_reference_val_2d = 85_000_000
    UNet_reference_val_corresp_GB = 8
    UNet_reference_val_corresp_bs_2d = 12
    UNet_reference_val_corresp_bs_3d = 2
    UNet_featuremap_min_edge_length = 4
    UNet_blocks_per_stage_encoder = (2,) * 14
    UNet_blocks_per_stage_decoder = (2,) * 13
    UNet_min_batch_size = 2
    UNet_max_batch_size_2d: int | None = None
    UNet_max_batch_size_3d: int | None = None
    # the patch shrinks until a batch of this many fits the budget (nnU-Net: 2)
    UNet_shrink_until_batch_size_2d = 2
    UNet_shrink_until_batch_size_3d = 2
    max_dataset_covered = 0.05  # a batch sees at most 5% of the dataset's voxels
    lowres_creation_threshold = 0.25  # 3d_lowres when the fullres patch covers < 25% of the median image
    anisotropy_threshold = ANISO_THRESHOLD

    transformer_max_preset = "M"
    transformer_min_preset = "S"

    def __init__(self, dataset: str | int, gpu_memory_target_in_gb: float = 8, plans_name: str | None = None,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False,
                 preprocessor_name: str = "DefaultPreprocessor"):
        from autossl.raw.dataset import RawDataset
        from autossl.utilities.dataset_name import find_dataset_name

        self.dataset_name = find_dataset_name(dataset)
        self.raw_dataset_folder = paths.raw_dir() / self.dataset_name
        self.preprocessed_folder = paths.preprocessed_dir() / self.dataset_name
        self.raw = RawDataset(self.raw_dataset_folder)
        self.dataset_json = self.raw.dataset_json
        fp_file = self.preprocessed_folder / "dataset_fingerprint.json"
        if not fp_file.is_file():
            raise FileNotFoundError(f"{fp_file}: fingerprint missing; run autossl_extract_fingerprint -d "
                                    f"{self.dataset_name} (or autossl.fingerprint.extract_fingerprint) first")
        self.dataset_fingerprint = load_json(fp_file)
        self.gpu_memory_target_in_gb = float(gpu_memory_target_in_gb)
        self.plans_identifier = plans_name or self.default_plans_name
        self.preprocessor_name = preprocessor_name
        self.suppress_transpose = suppress_transpose
        if overwrite_target_spacing is not None:
            if len(overwrite_target_spacing) != 3:
                raise ValueError(f"overwrite_target_spacing must be three floats, got {overwrite_target_spacing!r}")
            overwrite_target_spacing = [float(s) for s in overwrite_target_spacing]
        self.overwrite_target_spacing = overwrite_target_spacing
        self.plans: dict | None = None
        self._estimate_cache: dict = {}
        splits = self.raw_dataset_folder / "splits_final.json"
        if splits.is_file():
            _maybe_copy_splits_file(splits, self.preprocessed_folder / "splits_final.json")

    # ------------------------------------------------------------------ dataset facts
    @property
    def num_input_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def num_output_channels(self) -> int:
        return len(self.dataset_json["labels"])  # as nnU-Net: one per entry in 'labels'

    @property
    def num_training_cases(self) -> int:
        """Labelled + unlabelled training cases (both are sampled during training)."""
        fp = self.dataset_fingerprint
        if "n_labeled" in fp:
            return int(fp["n_labeled"]) + int(fp.get("n_unlabeled", 0))
        return len(fp["spacings"])

    def determine_reader_writer(self) -> str:
        return type(self.raw.reader_writer()).__name__

    # ------------------------------------------------------------------ nnU-Net rules
    def determine_fullres_target_spacing(self) -> np.ndarray:
        """Median spacing; an axis much coarser (>3x) and with far fewer voxels (3x) than the others
        gets the 10th percentile of its spacings instead, but never finer than the other axes."""
        if self.overwrite_target_spacing is not None:
            return np.array(self.overwrite_target_spacing)
        spacings = np.vstack(self.dataset_fingerprint["spacings"])
        sizes = np.vstack(self.dataset_fingerprint["shapes_after_crop"])
        target = np.percentile(spacings, 50, 0)
        target_size = np.percentile(sizes, 50, 0)
        worst = int(np.argmax(target))
        other = [i for i in range(len(target)) if i != worst]
        other_spacings = [target[i] for i in other]
        other_sizes = [target_size[i] for i in other]
        has_aniso_spacing = target[worst] > self.anisotropy_threshold * max(other_spacings)
        has_aniso_voxels = target_size[worst] * self.anisotropy_threshold < min(other_sizes)
        if has_aniso_spacing and has_aniso_voxels:
            t = np.percentile(spacings[:, worst], 10)
            if t < max(other_spacings):
                t = max(max(other_spacings), t) + 1e-5
            target[worst] = t
        return target

    def determine_transpose(self) -> tuple[list[int], list[int]]:
        if self.suppress_transpose:
            return [0, 1, 2], [0, 1, 2]
        target = self.determine_fullres_target_spacing()
        max_axis = int(np.argmax(target))
        forward = [max_axis] + [i for i in range(3) if i != max_axis]
        backward = [int(np.argwhere(np.array(forward) == i)[0][0]) for i in range(3)]
        return forward, backward

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self) -> tuple[list[str], list[bool]]:
        schemes = [normalization_scheme_for_channel(n) for n in self.dataset_json["channel_names"].values()]
        if self.dataset_fingerprint["median_relative_size_after_cropping"] < 3 / 4.0 \
                or self.dataset_json.get("use_mask_for_norm"):
            use_mask = [bool(get_normalization_class(s).leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true)
                        for s in schemes]
        else:
            use_mask = [False] * len(schemes)
        return schemes, use_mask

    def determine_resampling(self) -> tuple[str, dict, str, dict]:
        data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
        seg_kwargs = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
        return RESAMPLING_FN, data_kwargs, RESAMPLING_FN, seg_kwargs

    def determine_segmentation_softmax_export_fn(self) -> tuple[str, dict]:
        return RESAMPLING_FN, {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}

    def generate_data_identifier(self, configuration_name: str) -> str:
        return f"{self.plans_identifier}_{configuration_name}"

    # ------------------------------------------------------------------ network size estimate
    def base_num_features(self, dim: int) -> int:
        """Features of the first stage (presets may differ between 2D and 3D)."""
        return self.UNet_base_num_features

    def features_per_stage(self, num_stages: int, dim: int) -> tuple[int, ...]:
        cap = self.UNet_max_features_2d if dim == 2 else self.UNet_max_features_3d
        return tuple(min(cap, self.base_num_features(dim) * 2 ** i) for i in range(num_stages))

    def reference_and_batch(self, dim: int) -> tuple[float, int]:
        """(reference feature-map size, the batch size it corresponds to) for our memory target."""
        ref = self.UNet_reference_val_2d if dim == 2 else self.UNet_reference_val_3d
        ref_bs = self.UNet_reference_val_corresp_bs_2d if dim == 2 else self.UNet_reference_val_corresp_bs_3d
        return ref * (self.gpu_memory_target_in_gb / self.UNet_reference_val_corresp_GB), ref_bs

    def architecture(self, dim: int, conv_kernel_sizes, pool_op_kernel_sizes) -> dict:
        num_stages = len(pool_op_kernel_sizes)
        conv = f"torch.nn.modules.conv.Conv{dim}d"
        norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
        return {
            "network_class_name": self.UNet_class_name,
            "arch_kwargs": {
                "n_stages": num_stages,
                "features_per_stage": list(self.features_per_stage(num_stages, dim)),
                "conv_op": conv,
                "kernel_sizes": [list(map(int, k)) for k in conv_kernel_sizes],
                "strides": [list(map(int, s)) for s in pool_op_kernel_sizes],
                "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:num_stages]),
                "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:num_stages - 1]),
                "conv_bias": True,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }

    def static_estimate_VRAM_usage(self, patch_size, architecture: dict) -> float:
        """PlainConvUNet.compute_conv_feature_map_size(patch) for this architecture (cached)."""
        key = json.dumps([list(map(int, patch_size)), architecture["arch_kwargs"]], default=_json_value)
        if key not in self._estimate_cache and architecture["network_class_name"] == PLAIN_CONV_UNET:
            # the same number without building the network: planning never imports torch
            self._estimate_cache[key] = float(plain_conv_unet_feature_map_size(
                patch_size, architecture["arch_kwargs"], self.num_output_channels))
        if key not in self._estimate_cache:
            from autossl.networks.build import locate

            kwargs = deepcopy(architecture["arch_kwargs"])
            for k in architecture["_kw_requires_import"]:
                if kwargs.get(k) is not None:
                    kwargs[k] = locate(kwargs[k])
            net = locate(architecture["network_class_name"])(
                input_channels=self.num_input_channels, num_classes=self.num_output_channels, **kwargs)
            self._estimate_cache[key] = float(net.compute_conv_feature_map_size([int(p) for p in patch_size]))
        return self._estimate_cache[key]

    # ------------------------------------------------------------------ one configuration
    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float) -> dict:
        spacing = np.asarray(spacing, dtype=float)
        if not np.all(spacing > 0):
            raise ValueError(f"{self.dataset_name}: spacing must be > 0, got {spacing.tolist()}")
        dim = len(spacing)
        tmp = 1 / spacing
        side = 256 ** 3 if dim == 3 else 2048 ** 2
        initial_patch = [round(i) for i in tmp * (side / np.prod(tmp)) ** (1 / dim)]
        initial_patch = np.array([min(i, j) for i, j in zip(initial_patch, median_shape[:dim])])

        def topology(patch):
            return get_pool_and_conv_props(spacing, patch, self.UNet_featuremap_min_edge_length, 999999)

        _, pool_sizes, conv_sizes, patch_size, divisible_by = topology(initial_patch)
        arch = self.architecture(dim, conv_sizes, pool_sizes)
        estimate = self.static_estimate_VRAM_usage(patch_size, arch)
        reference, ref_bs = self.reference_and_batch(dim)
        shrink_until = self.UNet_shrink_until_batch_size_2d if dim == 2 else self.UNet_shrink_until_batch_size_3d

        while estimate / ref_bs * shrink_until > reference:
            # shrink the axis that is largest relative to the median shape. Subtract the divisor of the
            # shrunk shape (recomputed) so that valid sizes in between are not skipped
            axis = int(np.argsort([i / j for i, j in zip(patch_size, median_shape[:dim])])[-1])
            patch_size = list(patch_size)
            trial = deepcopy(patch_size)
            trial[axis] -= divisible_by[axis]
            *_, divisible_by = topology(trial)
            patch_size[axis] -= divisible_by[axis]
            _, pool_sizes, conv_sizes, patch_size, divisible_by = topology(patch_size)
            arch = self.architecture(dim, conv_sizes, pool_sizes)
            estimate = self.static_estimate_VRAM_usage(patch_size, arch)

        batch_size = round(reference / estimate * ref_bs)
        bs_5_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered
                             / np.prod(patch_size, dtype=np.float64))
        batch_size = max(min(batch_size, bs_5_percent), self.UNet_min_batch_size)
        max_bs = self.UNet_max_batch_size_2d if dim == 2 else self.UNet_max_batch_size_3d
        if max_bs is not None:
            batch_size = max(min(batch_size, max_bs), self.UNet_min_batch_size)

        res_data, res_data_kw, res_seg, res_seg_kw = self.determine_resampling()
        res_prob, res_prob_kw = self.determine_segmentation_softmax_export_fn()
        schemes, use_mask = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        transformer = self.transformer_architecture(patch_size, int(batch_size))
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": int(batch_size),
            "patch_size": [int(p) for p in patch_size],
            "median_image_size_in_voxels": median_shape,
            "spacing": spacing,
            "normalization_schemes": schemes,
            "use_mask_for_norm": use_mask,
            "resampling_fn_data": res_data,
            "resampling_fn_seg": res_seg,
            "resampling_fn_data_kwargs": res_data_kw,
            "resampling_fn_seg_kwargs": res_seg_kw,
            "resampling_fn_probabilities": res_prob,
            "resampling_fn_probabilities_kwargs": res_prob_kw,
            "architecture": arch,
            "transformer_architecture": transformer,
            # Semiformer's CNN + transformer network: references to the two entries above
            "hybrid_architecture": hybrid_architecture() if transformer else None,
        }

    def transformer_architecture(self, patch_size, batch_size: int) -> dict:
        return transformer_architecture(patch_size, batch_size, self.num_input_channels, self.gpu_memory_target_in_gb,
                                        max_preset=self.transformer_max_preset, min_preset=self.transformer_min_preset)

    # ------------------------------------------------------------------ all configurations
    def plan_experiment(self) -> dict:
        transpose_forward, transpose_backward = self.determine_transpose()
        fullres_spacing = self.determine_fullres_target_spacing()
        fullres_spacing_t = fullres_spacing[transpose_forward]
        fp = self.dataset_fingerprint
        new_shapes = [compute_new_shape(j, i, fullres_spacing) for i, j in zip(fp["spacings"], fp["shapes_after_crop"])]
        new_median_shape = np.median(new_shapes, 0)
        new_median_shape_t = new_median_shape[transpose_forward]
        approximate_n_voxels_dataset = float(np.prod(new_median_shape_t, dtype=np.float64) * self.num_training_cases)

        plan_3d_fullres = plan_3d_lowres = None
        if new_median_shape_t[0] != 1:
            plan_3d_fullres = self.plan_3d_fullres(fullres_spacing_t, new_median_shape_t, approximate_n_voxels_dataset)
            # the median shape at the fullres plan's spacing (new_median_shape_t unless a subclass coarsened it)
            fullres_median_shape_t = np.asarray(plan_3d_fullres["median_image_size_in_voxels"], dtype=float)
            plan_3d_lowres = self._plan_lowres(plan_3d_fullres, fullres_median_shape_t)
            if plan_3d_lowres is not None:
                plan_3d_lowres["batch_dice"] = False
                plan_3d_fullres["batch_dice"] = True
            else:
                plan_3d_fullres["batch_dice"] = False

        plan_2d = self.get_plans_for_configuration(fullres_spacing_t[1:], new_median_shape_t[1:],
                                                   self.generate_data_identifier("2d"), approximate_n_voxels_dataset)
        plan_2d["batch_dice"] = True

        median_spacing = np.median(fp["spacings"], 0)[transpose_forward]
        median_shape = np.median(fp["shapes_after_crop"], 0)[transpose_forward]
        self.preprocessed_folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.preprocessed_folder / "dataset.json") as tmp:
            shutil.copyfile(self.raw_dataset_folder / "dataset.json", tmp)

        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_identifier,
            "original_median_spacing_after_transp": [float(i) for i in median_spacing],
            "original_median_shape_after_transp": [int(round(i)) for i in median_shape],
            "image_reader_writer": self.determine_reader_writer(),
            "transpose_forward": [int(i) for i in transpose_forward],
            "transpose_backward": [int(i) for i in transpose_backward],
            "configurations": {"2d": plan_2d},
            "experiment_planner_used": self.__class__.__name__,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": fp["foreground_intensity_properties_per_channel"],
        }
        if plan_3d_lowres is not None:
            plans["configurations"]["3d_lowres"] = plan_3d_lowres
            if plan_3d_fullres is not None:
                plans["configurations"]["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
        if plan_3d_fullres is not None:
            plans["configurations"]["3d_fullres"] = plan_3d_fullres
            if plan_3d_lowres is not None:
                plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres",
                                                                 "previous_stage": "3d_lowres"}
        plans = _to_json_types(plans)
        self.plans = self.save_plans(plans)
        return self.plans

    def plan_3d_fullres(self, spacing_t, median_shape_t, approximate_n_voxels_dataset: float) -> dict:
        """The 3d_fullres configuration at the target spacing (subclasses may coarsen it, see CPUPlanner)."""
        return self.get_plans_for_configuration(spacing_t, median_shape_t, self.generate_data_identifier("3d_fullres"),
                                                approximate_n_voxels_dataset)

    def lowres_patch_is_large_enough(self, patch_size, median_shape) -> bool:
        """nnU-Net's criterion: the patch holds >= ``lowres_creation_threshold`` (25%) of the median
        image's voxels (``median_shape`` unrounded, at the spacing the patch was planned for)."""
        return (np.prod(patch_size, dtype=np.float64) / np.prod(median_shape, dtype=np.float64)
                >= self.lowres_creation_threshold)

    def _plan_lowres(self, plan_3d_fullres: dict, new_median_shape_t: np.ndarray) -> dict | None:
        """Coarsen the spacing by 3% steps (anisotropic axes first) until the patch covers >= 25% of
        the median image; drop the result if it is less than half the fullres image size."""
        median_shape = np.asarray(new_median_shape_t, dtype=np.float64)
        median_num_voxels = np.prod(new_median_shape_t, dtype=np.float64)
        fullres_spacing = np.asarray(plan_3d_fullres["spacing"], dtype=float)
        lowres_spacing = deepcopy(fullres_spacing)
        plan = None
        patch_size = plan_3d_fullres["patch_size"]
        while not self.lowres_patch_is_large_enough(patch_size, median_shape):
            max_spacing = max(lowres_spacing)
            if np.any((max_spacing / lowres_spacing) > 2):
                lowres_spacing[(max_spacing / lowres_spacing) > 2] *= 1.03
            else:
                lowres_spacing *= 1.03
            median_shape = fullres_spacing / lowres_spacing * np.asarray(new_median_shape_t, dtype=np.float64)
            median_num_voxels = np.prod(median_shape, dtype=np.float64)
            plan = self.get_plans_for_configuration(
                lowres_spacing.copy(),
                tuple(round(i) for i in fullres_spacing / lowres_spacing * new_median_shape_t),
                self.generate_data_identifier("3d_lowres"),
                float(median_num_voxels * self.num_training_cases))
            patch_size = plan["patch_size"]
        if plan is not None and np.prod(new_median_shape_t, dtype=np.float64) / median_num_voxels < 2:
            plan = None
        return plan

    def save_plans(self, plans: dict) -> dict:
        """Write atomically; configurations of an existing file that we did not plan are kept."""
        plans_file = self.preprocessed_folder / f"{self.plans_identifier}.json"
        if plans_file.is_file():
            try:
                old = load_json(plans_file).get("configurations", {})
            except ValueError:
                old = {}
            for name, cfg in old.items():
                if name not in plans["configurations"]:
                    plans["configurations"][name] = cfg
        save_json(plans, plans_file, sort_keys=False)
        return plans


def _maybe_copy_splits_file(source: Path, target: Path) -> None:
    """Copy the raw dataset's splits_final.json; an existing target must agree with it fold by fold."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        save_json(load_json(source), target)
        return
    src, tgt = load_json(source), load_json(target)
    for i, fold in enumerate(src):
        if i >= len(tgt) or set(fold["train"]) != set(tgt[i]["train"]) or set(fold["val"]) != set(tgt[i]["val"]):
            raise ValueError(f"{target}: fold {i} differs from {source}; delete one of them or make them agree")
