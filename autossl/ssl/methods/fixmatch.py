"""FixMatch (Sohn et al., NeurIPS 2020) for segmentation.

Weak view: the unlabelled batch as delivered (spatial + mirror). Strong view:
``ctx.strong_augment`` of the weak view (intensity only, so the geometry is identical) plus
CutOut. The weak view's prediction (no gradient) gives a hard pseudo-label, kept at voxels
where max p >= τ; the strong view's prediction is trained against it with CE averaged over all
voxels of the batch (FixMatch's mean of mask·CE). L = L_s + λ_u(t)·L_u, λ_u ramped to 1 with
the sigmoid ramp-up over the run (the paper: constant 1; see documentation/ssl_methods.md).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from autossl.components.augmentation.strong import cutout
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods._shared import (clean_option, clean_pseudo_labels, cpu_generator, has_unlabeled, ramp_weight,
                                         rampup_option, require_label_maps, split_output, supervised_loss_only)
from autossl.ssl.registry import register


def confident_pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax (B, 1, *), mask max p >= threshold (B, 1, *) float, max p (B, 1, *)) of detached logits."""
    probs = torch.softmax(logits.detach().float(), 1)
    conf, labels = probs.max(1, keepdim=True)
    return labels, (conf >= threshold).float(), conf


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over all voxels of mask·CE(logits, labels)."""
    return (F.cross_entropy(logits.float(), labels[:, 0], reduction="none") * mask[:, 0]).mean()


@register("fixmatch")
class FixMatch(SSLMethod):
    """Options: threshold (0.95), lambda (1.0), clean (true: pseudo-labels cleaned to the largest
    component of single-structure classes), rampup (1.0: the whole run; 0 = constant λ_u), cutout (true),
    cutout_min / cutout_max (0.05 / 0.25: share of the patch erased)."""

    scalars = ("loss_sup", "loss_unsup", "pl_confidence", "pl_share")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.threshold = self.option("threshold", 0.95)
        self.lambda_u = self.option("lambda", 1.0)
        # ramped, not the paper's constant λ_u: early, nearly every confident voxel is background,
        # and a constant weight teaches a from-scratch network to under-segment small structures
        self.rampup = rampup_option(self, cold=1.0)
        self.cutout = self.option("cutout", True)
        self.cutout_fraction = (self.option("cutout_min", 0.05), self.option("cutout_max", 0.25))
        self.clean = clean_option(self)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--ssl fixmatch: threshold must be in [0, 1], got {self.threshold}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student")]

    def relative_cost(self, r: float) -> float:
        """Weak-view forward over rB, forward + backward over B + rB."""
        return (r + 3 * (1 + r)) / 3

    def strong_view(self, weak: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        strong = ctx.strong_augment(weak)
        if strong.shape != weak.shape:
            raise RuntimeError(f"ctx.strong_augment changed the shape {tuple(weak.shape)} -> {tuple(strong.shape)}; "
                               "it must be intensity-only")
        if self.cutout:
            strong, _ = cutout(strong, cpu_generator(ctx), self.cutout_fraction)
        return strong

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        if not has_unlabeled(unlabeled):
            yield supervised_loss_only(net, labeled, ctx)
            return
        weak = unlabeled["data"]
        with torch.no_grad(), ctx.autocast():
            weak_logits = main_output(net(weak))
        labels, mask, conf = confident_pseudo_labels(weak_logits, self.threshold)
        labels = clean_pseudo_labels(labels, ctx, self.clean)
        with ctx.autocast():
            out_l, out_s = split_output(net(torch.cat([x_l, self.strong_view(weak, ctx)])), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        loss_unsup = masked_ce(main_output(out_s), labels, mask)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("pl_confidence", conf.mean())
        ctx.log("pl_share", mask.mean())
        yield loss_sup + ramp_weight(self.lambda_u, self.rampup, ctx) * loss_unsup
