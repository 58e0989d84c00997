"""FixMatch (Sohn et al., NeurIPS 2020) for segmentation.

Weak view: the unlabelled batch as delivered (spatial + mirror). Strong view:
``ctx.strong_augment`` of the weak view (intensity only, so the geometry is identical), then
CutMix with the next image of the batch (default; UniMatch's strong view) or CutOut. The weak
view's prediction (no gradient) gives a hard pseudo-label, kept at voxels where max p >= τ and
mixed like the images; the strong view's prediction is trained against it with CE averaged over
all voxels of the batch (FixMatch's mean of mask·CE) plus, by default, the soft Dice over the
confident voxels of the batch. L = L_s + λ_u(t)·L_u, λ_u ramped to 1 (see
documentation/ssl_methods.md).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from autossl.components.augmentation.strong import cutmix, cutout
from autossl.components.losses import soft_dice_loss
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods._shared import (clean_option, clean_pseudo_labels, cpu_generator, cutmix_fraction_option,
                                         cutmix_partners, has_unlabeled, ramp_weight, rampup_option,
                                         require_label_maps, split_output, supervised_loss_only)
from autossl.ssl.registry import register


def confident_pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax (B, 1, *), mask max p >= threshold (B, 1, *) float, max p (B, 1, *)) of detached logits."""
    probs = torch.softmax(logits.detach().float(), 1)
    conf, labels = probs.max(1, keepdim=True)
    return labels, (conf >= threshold).float(), conf


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over all voxels of mask·CE(logits, labels)."""
    return (F.cross_entropy(logits.float(), labels[:, 0], reduction="none") * mask[:, 0]).mean()


def masked_pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                             dice: bool = True) -> torch.Tensor:
    """FixMatch's L_u: ``masked_ce``, plus with ``dice`` the foreground soft Dice over the batch on
    the voxels of ``mask``."""
    loss = masked_ce(logits, labels, mask)
    if dice:
        loss = loss + soft_dice_loss(logits, labels, batch_dice=True, mask=mask)
    return loss


@register("fixmatch")
class FixMatch(SSLMethod):
    """Options: threshold (0.95), lambda (1.0), clean (true: pseudo-labels cleaned to the largest
    component of single-structure classes), rampup (1.0: the whole run; 0 = constant λ_u), dice (true:
    the Dice term of L_u), cutmix (true), cutmix_min / cutmix_max (0.25 / 0.5: share of the patch the
    box covers), cutout (false; true when cutmix is off), cutout_min / cutout_max (0.05 / 0.25: share
    of the patch erased)."""

    scalars = ("loss_sup", "loss_unsup", "pl_confidence", "pl_share")
    default_unlabeled_ratio = 1.0
    #: CutMix of the strong views (its training step mixes them; subclasses that build their own
    #: step from ``strong_view`` keep CutOut)
    default_cutmix = True

    def __init__(self, **options):
        super().__init__(**options)
        self.threshold = self.option("threshold", 0.95)
        self.lambda_u = self.option("lambda", 1.0)
        # ramped, not the paper's constant λ_u: early, nearly every confident voxel is background,
        # and a constant weight teaches a from-scratch network to under-segment small structures
        self.rampup = rampup_option(self, cold=1.0)
        # CutMix between strong views (UniMatch's) rather than CutOut: a mixed view keeps every
        # voxel trained, and its pseudo-label is the same mix of the two weak views' labels
        self.cutmix = self.option("cutmix", self.default_cutmix)
        self.cutmix_fraction = cutmix_fraction_option(self)
        self.cutout = self.option("cutout", not self.cutmix)
        self.cutout_fraction = (self.option("cutout_min", 0.05), self.option("cutout_max", 0.25))
        # CE over all voxels is nearly all background (pl_share 0.9 on A2D-3, most of it
        # background); the Dice term over the confident voxels weighs each structure alike
        self.dice = self.option("dice", True)
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

    def mix(self, strong: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, ctx: TrainingContext):
        """CutMix each strong view with the next one of the batch under a random box; the
        pseudo-labels and the confidence mask are mixed the same way."""
        if not self.cutmix or strong.shape[0] < 2:
            return strong, labels, mask
        _, partner, box = cutmix_partners(strong, strong, ctx, self.cutmix_fraction)
        return tuple(cutmix(t, t[partner], box) for t in (strong, labels, mask))

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
        strong, labels, mask = self.mix(self.strong_view(weak, ctx), labels, mask, ctx)
        with ctx.autocast():
            out_l, out_s = split_output(net(torch.cat([x_l, strong])), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        loss_unsup = masked_pseudo_label_loss(main_output(out_s), labels, mask, self.dice)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("pl_confidence", conf.mean())
        ctx.log("pl_share", mask.mean())
        yield loss_sup + ramp_weight(self.lambda_u, self.rampup, ctx) * loss_unsup
