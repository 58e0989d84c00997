"""``-pl cpu``: plans for machines without a GPU (plans name ``autosslPlansCPU``).

Same rules as the default planner (spacing, transpose, normalisation, topology, patch shrinking,
configurations), with a compute budget instead of a GPU memory budget:

- thinner U-Nets: features ``8 * 2**i`` capped at 64 (3D) / 128 (2D);
- the feature-map reference that nnU-Net scales with GPU memory is a fixed CPU budget
  (``gpu_memory_target_in_gb`` is ignored): a patch shrinks until one sample's feature maps are
  at most ``UNet_reference_val_*`` / 2, and the batch is what fits in that budget, between 2 and
  ``UNet_max_batch_size_*``;
- the smallest transformers (presets XT / T).

The numbers were chosen so that the H3D benchmark (Hippocampus 3d_fullres, 1000 steps + 60 test
cases) fits in 15 minutes on 2 CPU cores with semi-supervised methods that run two or three
networks per step; documentation/planning.md has the timings behind them.
"""
from __future__ import annotations

from autossl.planning.default_planner import ExperimentPlanner


class CPUPlanner(ExperimentPlanner):
    default_plans_name = "autosslPlansCPU"

    UNet_base_num_features = 8
    UNet_max_features_3d = 64
    UNet_max_features_2d = 128
    # feature-map budgets (PlainConvUNet.compute_conv_feature_map_size) for the reference batch
    UNet_reference_val_3d = 6_000_000
    UNet_reference_val_2d = 6_000_000
    UNet_reference_val_corresp_bs_3d = 2
    UNet_reference_val_corresp_bs_2d = 8
    UNet_max_batch_size_3d = 4
    UNet_max_batch_size_2d = 16

    transformer_min_preset = "XT"
    transformer_max_preset = "T"
    transformer_memory_budget_gb = 4.0

    def reference_and_batch(self, dim: int) -> tuple[float, int]:
        if dim == 2:
            return float(self.UNet_reference_val_2d), self.UNet_reference_val_corresp_bs_2d
        return float(self.UNet_reference_val_3d), self.UNet_reference_val_corresp_bs_3d

    def transformer_architecture(self, patch_size, batch_size: int) -> dict:
        from autossl.planning.transformer import transformer_architecture

        return transformer_architecture(patch_size, batch_size, self.num_input_channels,
                                        self.transformer_memory_budget_gb, max_preset=self.transformer_max_preset,
                                        min_preset=self.transformer_min_preset)
