"""Π-model (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017).

One network, evaluated twice per step on the same labelled + unlabelled batch under two
independent stochastic perturbations (one forward pass over both copies of the batch): input
noise n = clamp(N(0, σ²), -c, c) drawn separately for each branch, and the network's dropout
(``NetworkSpec.dropout``: SSL4MIS's encoder dropout, active in train mode, so the two copies
draw different masks); ``augment=strong`` adds an independent draw of ``ctx.strong_augment``
(intensity only) to each branch. With
z = softmax f(x + n1) and z̃ = softmax f(x + n2):

    L = L_s(f(x_l + n1)) + w(t) · mean over voxels and classes of (z - z̃)²

the squared difference averaged over the voxels of the labelled AND the unlabelled patches (the
paper's 1/(C|B|) Σ ||z_i - z̃_i||² over the whole batch) and over the C classes; L_s on the first
branch only, as the paper's cross-entropy on z. Both branches carry gradients (the paper does not
stop the gradient of z̃; ``stop_gradient=true`` detaches it). w(t) is the package's sigmoid
ramp-up exp(-5(1 - t/T)²) counted in the semi-supervised phase (``_shared.ramp_weight``).

Weight: λ_max = 0.1, mean teacher's (SSL4MIS) for the same softmax MSE, so that Π-model,
temporal ensembling and mean teacher differ only in where their target comes from. The paper's
maximum weight, scaled by the labelled share M/N, was tuned for its CIFAR/SVHN setting (Adam,
300 epochs, cross-entropy on 10 classes). Prediction: the network as planned, without dropout.
"""
from __future__ import annotations

from typing import Iterator

import torch

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods._shared import (check_choice, has_unlabeled, input_noise, ramp_weight, rampup_option,
                                         require_label_maps, split_output)
from autossl.ssl.registry import register


def pi_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean over batch, voxels and classes of (softmax a - softmax b)², (B, C, *spatial) logits."""
    return ((torch.softmax(logits_a.float(), 1) - torch.softmax(logits_b.float(), 1)) ** 2).mean()


def check_dropout(method: SSLMethod, rate: float) -> float:
    if not 0 <= rate < 1:
        raise ValueError(f"--ssl {method.name}: dropout must be in [0, 1), got {rate}")
    return rate


def check_noise(method: SSLMethod, std: float, clip: float) -> tuple[float, float]:
    if std < 0 or clip < 0:
        raise ValueError(f"--ssl {method.name}: noise_std and noise_clip must be >= 0, got {std}, {clip}")
    return std, clip


@register("pi_model")
class PiModel(SSLMethod):
    """Options: lambda (0.1), rampup (1.0 from scratch, 0.1 after a warm start: share of the
    semi-supervised phase), noise_std (0.1), noise_clip (0.2), dropout (0.2: bottleneck rate of
    the encoder dropout; 0 = none), augment (none|strong: ctx.strong_augment per branch),
    labeled_consistency (true: the consistency also covers the labelled patches),
    stop_gradient (false: true detaches the second branch)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.lambda_max = self.option("lambda", 0.1)
        if self.lambda_max < 0:
            raise ValueError(f"--ssl {self.name}: lambda must be >= 0, got {self.lambda_max}")
        self.rampup = rampup_option(self, cold=1.0)
        self.noise_std, self.noise_clip = check_noise(self, self.option("noise_std", 0.1),
                                                      self.option("noise_clip", 0.2))
        self.dropout = check_dropout(self, self.option("dropout", 0.2))
        self.augment = check_choice(self.name, "augment", self.option("augment", "none"), ("none", "strong"))
        self.labeled_consistency = self.option("labeled_consistency", True)
        self.stop_gradient = self.option("stop_gradient", False)

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student", dropout=self.dropout)]

    def relative_cost(self, r: float) -> float:
        """Two forward + backward passes over B + rB (one without gradient with stop_gradient)."""
        return (3 + (1 if self.stop_gradient else 3)) * (1 + r) / 3

    def perturb(self, x: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        if self.augment == "strong":
            x = ctx.strong_augment(x)
        return x + input_noise(x, ctx, self.noise_std, self.noise_clip)

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        x = torch.cat([x_l, unlabeled["data"]]) if has_unlabeled(unlabeled) else x_l
        n = x.shape[0]
        if self.stop_gradient:
            with ctx.autocast():
                out_a = net(self.perturb(x, ctx))
            with torch.no_grad(), ctx.autocast():
                out_b = net(self.perturb(x, ctx))
        else:
            # both branches in one forward pass (2n patches): dropout draws its masks per element and
            # the planned networks normalise per sample, so the halves are independent evaluations;
            # one pass also keeps DDP to one forward per backward
            with ctx.autocast():
                out_a, out_b = split_output(net(torch.cat([self.perturb(x, ctx), self.perturb(x, ctx)])), n)
        out_a_l, _ = split_output(out_a, n_l)
        loss_sup = ctx.supervised_loss(out_a_l, labeled["target"])
        m_a, m_b = main_output(out_a), main_output(out_b)
        if not self.labeled_consistency:
            m_a, m_b = m_a[n_l:], m_b[n_l:]
        loss_unsup = pi_consistency(m_a, m_b) if m_a.shape[0] > 0 else loss_sup.new_zeros(())
        weight = ramp_weight(self.lambda_max, self.rampup, ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("ramp_weight", weight)
        yield loss_sup + weight * loss_unsup
