"""``-pl cpu``: plans for machines without a GPU (plans name ``autosslPlansCPU``).

Same rules as the default planner (spacing, transpose, normalisation, topology, patch shrinking,
configurations), with a compute budget instead of a GPU memory budget:

- thinner U-Nets: features ``16 * 2**i`` capped at 128 (3D), ``8 * 2**i`` capped at 128 (2D);
- the feature-map reference that nnU-Net scales with GPU memory is a fixed compute budget per
  step (``gpu_memory_target_in_gb`` is ignored). As in nnU-Net the patch shrinks until a minimum
  batch fits the budget, and the batch is what fits, up to ``UNet_max_batch_size_*``. The
  minimum is 2 in 3D (nnU-Net's rule) but 12 in 2D (the batch nnU-Net's 2D reference is defined
  with): with the whole slice as the patch, the CPU budget leaves a batch of 3, and 1000 such
  iterations are too few samples to learn from. On ACDC (A2D, 70 patients, 1000 iterations) the
  full-slice plan (256x224, batch 3) reached 46.7 mean Dice and predicted nothing for its first
  500 iterations; 128x128 patches in batches of 12, at the same cost per step, reached 73.4;
- 3D field of view: the budget buys a patch of about 41k voxels (Hippocampus 32x40x32), which
  at nnU-Net's target spacing can be a small part of a large image (Left Atrium, 0.625 mm,
  88x576x576: 10x64x64 = 6 x 40 x 40 mm; UA-MT's cropped cases 88x~130x~130: 28x40x40 =
  17.5 x 25 x 25 mm around a ~50 mm atrium). 3d_fullres therefore coarsens its target spacing
  (nnU-Net's lowres step: x1.03, axes finer than half the coarsest first) while the patch spans
  less than ``fullres_min_fov_fraction_3d`` (half) of the median image on some axis, by at most
  ``fullres_max_spacing_factor_3d`` (2x) per axis, never along the thick-slice axis of
  anisotropic data (> 3x the finest); 3d_lowres must span half of every axis besides nnU-Net's
  25% of the voxels. Cropped LA: 3d_fullres 1.06 mm, 30 x 43 x 43 mm of 55 x 82 x 83 mm; full LA:
  3d_fullres 1.25 mm (the limit), 3d_lowres 3.5 mm, 35 x 225 x 225 mm. Hippocampus (its patch
  spans 80-91% of each axis) is unchanged;
- the smallest transformers (presets XT / T);
- 2D U-Nets train with AdamW (lr 1e-3, weight decay 1e-4; nnU-Net's Adam trainer variant at
  lr 1e-3) instead of SGD, written into the configuration as ``"optimizer"``: in a
  1000-iteration run SGD at nnU-Net's settings predicts only background for hundreds of
  iterations (ACDC, 3 labelled patients: the myocardium's training Dice was still 0 at
  iteration 500), AdamW segments every class from iteration 150 and ends with half the training
  loss (0.39 against 0.66). A semi-supervised method's warm start then hands over a network that
  has learnt its labelled cases. 3D keeps nnU-Net's SGD (measured on Hippocampus with it).

The numbers were chosen so that the H3D benchmark (Hippocampus 3d_fullres, 1000 steps + 60 test
cases) fits in 15 minutes on 2 CPU cores with semi-supervised methods that run two or three
networks per step; documentation/planning.md has the timings behind them.
"""
from __future__ import annotations

import numpy as np

from autossl.planning.default_planner import ExperimentPlanner


def axis_coverage(patch_size, median_shape) -> np.ndarray:
    """Share of the median image's extent the patch spans, per axis (at most 1)."""
    return np.minimum(np.asarray(patch_size, dtype=float) / np.asarray(median_shape, dtype=float), 1.0)


def coarser_spacing(spacing: np.ndarray, limit: np.ndarray) -> np.ndarray | None:
    """One step of nnU-Net's lowres rule (x1.03; axes finer than half the coarsest first), each
    axis at most ``limit``; None when every axis is at its limit."""
    spacing = np.asarray(spacing, dtype=float).copy()
    free = spacing < limit * (1 - 1e-9)
    if not free.any():
        return None
    fine = free & (spacing.max() / spacing > 2)
    step = fine if fine.any() else free
    spacing[step] = np.minimum(spacing[step] * 1.03, limit[step])
    return spacing


class CPUPlanner(ExperimentPlanner):
    default_plans_name = "autosslPlansCPU"

    UNet_base_num_features = 8  # 2D
    UNet_base_num_features_3d = 16
    UNet_max_features_3d = 128
    UNet_max_features_2d = 128
    # Compute budgets, in the units of nnU-Net's estimate (PlainConvUNet.compute_conv_feature_map_size
    # of one sample): the reference batch may use reference x batch elements per step. 3D: 5e6 x 2,
    # about 2 x 41k voxels at 16 base features (Hippocampus: 32x40x32, batch 2). 2D: 1.25e6 x 12 at 8
    # base features (3x3 instead of 3x3x3 kernels; measured, a step costs about 1.8x a 3D one at 8)
    UNet_reference_val_3d = 5_000_000
    UNet_reference_val_corresp_bs_3d = 2
    UNet_reference_val_2d = 1_250_000
    UNet_reference_val_corresp_bs_2d = 12
    UNet_max_batch_size_3d = 4
    UNet_max_batch_size_2d = 16
    UNet_shrink_until_batch_size_2d = 12

    #: the 2D U-Net's optimiser (see the module docstring); read by autossl.training.optim
    UNet_optimizer_2d = {"kind": "adamw", "lr": 1e-3, "weight_decay": 1e-4}

    # 3D field of view (see the module docstring): 3d_fullres coarsens its target spacing until
    # the patch spans >= 50% of the median image on every axis, by at most 2x per axis; 3d_lowres
    # also needs >= 50% on every axis besides nnU-Net's 25% of the voxels
    fullres_min_fov_fraction_3d = 0.5
    fullres_max_spacing_factor_3d = 2.0
    lowres_min_fov_fraction_3d = 0.5

    transformer_min_preset = "XT"
    transformer_max_preset = "T"
    transformer_memory_budget_gb = 4.0

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset)
        if len(spacing) == 2:
            plan["optimizer"] = {"cnn": dict(self.UNet_optimizer_2d)}
        return plan

    def plan_3d_fullres(self, spacing_t, median_shape_t, approximate_n_voxels_dataset: float) -> dict:
        """nnU-Net's plan at the target spacing; if its patch spans less than
        ``fullres_min_fov_fraction_3d`` of the median image on some axis, the spacing is coarsened
        (``coarser_spacing``, at most ``fullres_max_spacing_factor_3d`` x the target spacing) and
        the configuration replanned (same budget, so about the same patch in voxels, covering more)
        until it does or the limit is reached."""
        native = np.asarray(spacing_t, dtype=float)
        median = np.asarray(median_shape_t, dtype=float)
        plan = super().plan_3d_fullres(spacing_t, median_shape_t, approximate_n_voxels_dataset)
        spacing, shape = native, median
        limit = native * self.fullres_max_spacing_factor_3d
        # the out-of-plane axis of anisotropic data (nnU-Net's > 3x) keeps its spacing: its slices are
        # already few per mm, and nnU-Net treats that axis apart (separate-z resampling, 10th percentile)
        limit[native > self.anisotropy_threshold * native.min()] = native[native > self.anisotropy_threshold
                                                                          * native.min()]
        while axis_coverage(plan["patch_size"], shape).min() < self.fullres_min_fov_fraction_3d:
            spacing = coarser_spacing(spacing, limit)
            if spacing is None:
                break
            shape = native / spacing * median
            plan = self.get_plans_for_configuration(
                spacing.copy(), tuple(round(i) for i in shape), self.generate_data_identifier("3d_fullres"),
                approximate_n_voxels_dataset * float(np.prod(shape) / np.prod(median)))
        return plan

    def lowres_patch_is_large_enough(self, patch_size, median_shape) -> bool:
        """nnU-Net's 25% of the voxels, and >= ``lowres_min_fov_fraction_3d`` of every axis."""
        return (super().lowres_patch_is_large_enough(patch_size, median_shape)
                and axis_coverage(patch_size, median_shape).min() >= self.lowres_min_fov_fraction_3d)

    def base_num_features(self, dim: int) -> int:
        return self.UNet_base_num_features_3d if dim == 3 else self.UNet_base_num_features

    def reference_and_batch(self, dim: int) -> tuple[float, int]:
        if dim == 2:
            return float(self.UNet_reference_val_2d), self.UNet_reference_val_corresp_bs_2d
        return float(self.UNet_reference_val_3d), self.UNet_reference_val_corresp_bs_3d

    def transformer_architecture(self, patch_size, batch_size: int) -> dict:
        from autossl.planning.transformer import transformer_architecture

        return transformer_architecture(patch_size, batch_size, self.num_input_channels,
                                        self.transformer_memory_budget_gb, max_preset=self.transformer_max_preset,
                                        min_preset=self.transformer_min_preset)
