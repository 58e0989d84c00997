"""Bidirectional copy-paste (BCP; Bai et al., CVPR 2023).

A labelled and an unlabelled patch are mixed in both directions under one box mask M (a box
covering 2/3 of each side, zero elsewhere): "inward" X_in = X_u·(1 - M) + X_l·M (a labelled
box pasted into an unlabelled patch) and "outward" X_out = X_l'·(1 - M) + X_u'·M. Each mix's
target is the same mix of the labelled patch's ground truth and the unlabelled patch's
pseudo-label, predicted by an EMA teacher on the unmixed unlabelled patch (argmax, no
threshold) and cleaned to its largest connected component per class where the labelled cases
show the class to be one structure (``ctx.single_component_classes``; BCP's ACDC code does the
same). The student's loss on a mix is Dice + CE weighted 1 on its labelled voxels and
``u_weight`` (0.5) on its pseudo-labelled ones, at every deep-supervision scale:
L = ½ (L(X_in) + L(X_out)). The student predicts at test time (the paper's choice).

Pairs: the inward mix pairs labelled patch i with unlabelled patch i, the outward mix pairs it
with unlabelled patch i + 1, so every labelled and every unlabelled patch appears in both
directions (the paper splits its batch in halves, one per direction; at our short CPU budget
every labelled patch is used twice instead, at 2.3x the cost of a supervised iteration).

Departures: the paper's pre-training phase mixes labelled patches with each other; here the
trainer's supervised warm start (half the run by default, ``--warmup``) is plain supervised
training, like every other method's.
"""
from __future__ import annotations

from typing import Iterator

import torch

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.components.ema import ema_update, warmup_decay
from autossl.ssl.methods._shared import (check_choice, clean_pseudo_labels, cpu_generator, has_unlabeled,
                                         require_label_maps, split_output, supervised_loss_only)
from autossl.ssl.methods.cps import cutmix, hard_labels
from autossl.ssl.methods.ucmt import target_pyramid
from autossl.ssl.registry import register
from autossl.components.augmentation.strong import box_mask


def bidirectional_mix(x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, y_u: torch.Tensor,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCP's two mixes under the box mask M (B_l, 1, *spatial, 1 in the box): inward (labelled
    patch i's box in unlabelled patch i) and outward (unlabelled patch i + 1's box in labelled
    patch i), with their targets (ground truth where the labelled patch shows, pseudo-label
    elsewhere). Returns (x_in, t_in, x_out, t_out)."""
    n_l, n_u = x_l.shape[0], x_u.shape[0]
    inward = torch.arange(n_l, device=x_l.device) % n_u
    outward = (inward + 1) % n_u
    y_l = y_l.to(y_u.dtype)
    return (cutmix(x_u[inward], x_l, mask), cutmix(y_u[inward], y_l, mask),
            cutmix(x_l, x_u[outward], mask), cutmix(y_l, y_u[outward], mask))


def mixed_loss(ctx: TrainingContext, output, target_full: torch.Tensor, labelled_region: torch.Tensor,
               like, u_weight: float) -> torch.Tensor:
    """Dice + CE of a mixed patch: weight 1 on ``labelled_region`` (B, 1, *spatial, 1 = ground
    truth), ``u_weight`` on the rest (pseudo-labels), each term at every deep-supervision scale."""
    target = target_pyramid(target_full, like)
    region = labelled_region.float()
    return ctx.supervised_loss(output, target, mask=region) + u_weight * ctx.supervised_loss(output, target,
                                                                                             mask=1 - region)


@register("bcp")
class BCP(SSLMethod):
    """Options: u_weight (0.5), box (0.667: the box's share of each side), ema_decay (0.99),
    clean (true: largest component per single-structure class), inference (student|teacher)."""

    scalars = ("loss_in", "loss_out", "pl_cleaned", "pl_foreground")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.u_weight = self.option("u_weight", 0.5)
        self.box_side = self.option("box", 2.0 / 3.0)
        self.max_decay = self.option("ema_decay", 0.99)
        self.clean = self.option("clean", True)
        self.inference = check_choice(self.name, "inference", self.option("inference", "student"),
                                      ("student", "teacher"))
        if not 0 < self.box_side < 1:
            raise ValueError(f"--ssl {self.name}: box must be in (0, 1), got {self.box_side}")
        if self.u_weight < 0:
            raise ValueError(f"--ssl {self.name}: u_weight must be >= 0, got {self.u_weight}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student"), NetworkSpec("teacher", trainable=False, copy_of="student")]

    def inference_networks(self) -> list[str]:
        return [self.inference]

    def relative_cost(self, r: float) -> float:
        """Teacher forward over the rB unlabelled patches; student forward + backward over the
        2B mixed patches (inward and outward)."""
        return (r + 3 * 2) / 3

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        ema_update(ctx.networks["teacher"], [ctx.networks["student"]], warmup_decay(ctx.ssl_step, self.max_decay))

    def pseudo_labels(self, x_u: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        with torch.no_grad(), ctx.autocast():
            labels = hard_labels(main_output(ctx.networks["teacher"](x_u)))
        labels = clean_pseudo_labels(labels, ctx, self.clean)
        ctx.log("pl_foreground", (labels > 0).float().mean())
        return labels

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["student"]
        x_l, like = labeled["data"], labeled["target"]
        if not has_unlabeled(unlabeled):
            yield supervised_loss_only(net, labeled, ctx)
            return
        y_l = like[0] if isinstance(like, (list, tuple)) else like
        x_u = unlabeled["data"]
        n_l = x_l.shape[0]
        y_u = self.pseudo_labels(x_u, ctx)
        spatial = x_l.shape[2:]
        volume_share = self.box_side ** len(spatial)
        mask = box_mask(n_l, spatial, (volume_share, volume_share), cpu_generator(ctx), x_l.device)
        x_in, t_in, x_out, t_out = bidirectional_mix(x_l, y_l, x_u, y_u, mask)
        with ctx.autocast():
            out = net(torch.cat([x_in, x_out]))
        out_in, out_out = split_output(out, n_l)
        loss_in = mixed_loss(ctx, out_in, t_in, mask, like, self.u_weight)
        loss_out = mixed_loss(ctx, out_out, t_out, 1 - mask, like, self.u_weight)
        ctx.log("loss_in", loss_in)
        ctx.log("loss_out", loss_out)
        yield 0.5 * (loss_in + loss_out)
