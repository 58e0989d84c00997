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

from autossl.planning.default_planner import ExperimentPlanner


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
