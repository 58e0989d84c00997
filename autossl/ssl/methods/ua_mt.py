"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as in SSL4MIS.

Mean teacher whose consistency is kept only where the teacher is certain: T stochastic teacher
passes (input noise), uncertainty u = entropy of their mean softmax, mask u < H(t) with
H(t) = (0.75 + 0.25·sigmoid_rampup(t, T_H))·ln(C); the masked MSE is averaged over the kept
voxels and the classes.
"""
from __future__ import annotations

import math

import torch

from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods.mean_teacher import MeanTeacher, softmax_mse
from autossl.ssl.ramps import sigmoid_rampup
from autossl.ssl.registry import register


def entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Voxel-wise entropy -Σ_c p log(p + eps) of (B, C, *spatial) probabilities, shape (B, 1, *spatial)."""
    return -(probs * torch.log(probs + eps)).sum(1, keepdim=True)


def uncertainty_threshold(step: int, rampup_steps: int, num_classes: int) -> float:
    """H(t) ramped from 0.75·ln(C) to ln(C)."""
    return (0.75 + 0.25 * sigmoid_rampup(step, rampup_steps)) * math.log(num_classes)


def masked_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·(p_s - p_t)² / (C·Σ mask): the MSE over kept voxels (0 when none is kept)."""
    c = student_logits.shape[1]
    return (mask * softmax_mse(student_logits, teacher_logits)).sum() / (c * mask.sum() + 1e-16)


@register("ua_mt")
class UAMT(MeanTeacher):
    """Options: as mean_teacher, plus passes (8, stochastic teacher passes) and
    threshold_rampup (1.0, fraction of the run over which H(t) rises to ln C)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight", "pl_share", "pl_confidence", "uncertainty_threshold")

    def __init__(self, **options):
        super().__init__(**options)
        self.passes = self.option("passes", 8)
        self.threshold_rampup = self.option("threshold_rampup", 1.0)
        if self.passes < 1:
            raise ValueError(f"--ssl ua_mt: passes must be >= 1, got {self.passes}")

    def relative_cost(self, r: float) -> float:
        """Student forward + backward over B + rB, teacher forward over rB, 1 + ``passes`` times."""
        return (3 * (1 + r) + (1 + self.passes) * r) / 3

    def consistency(self, student_logits: torch.Tensor, x_u: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        teacher = ctx.networks["teacher"]
        with torch.no_grad(), ctx.autocast():
            teacher_logits = main_output(teacher(self.noisy(x_u, ctx))).float()
            mean_probs = torch.zeros_like(teacher_logits)
            for _ in range(self.passes):
                mean_probs += torch.softmax(main_output(teacher(self.noisy(x_u, ctx))).float(), 1)
            mean_probs /= self.passes
        u = entropy(mean_probs)
        threshold = uncertainty_threshold(ctx.ssl_step, int(round(self.threshold_rampup * ctx.ssl_total_steps)),
                                          student_logits.shape[1])
        mask = (u < threshold).float()
        ctx.log("pl_share", mask.mean())
        ctx.log("pl_confidence", mean_probs.max(1)[0].mean())
        ctx.log("uncertainty_threshold", threshold)
        return masked_consistency(student_logits, teacher_logits, mask)
