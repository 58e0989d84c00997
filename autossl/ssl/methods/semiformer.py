"""Semiformer (Weng et al., ECCV 2022; code wengzejia1/Semiformer) for segmentation.

One network of the "hybrid" kind (``autossl.networks.semiformer.Semiformer``, the plans'
``hybrid_architecture``): the planned CNN and the planned transformer as two branches that
exchange features through fusion modules at the CNN encoder's stages. FixMatch-style training:

    L = L_s(cnn) + L_s(vit) + λ_u(t)·[mean(m·CE(p_cnn(strong), ŷ)) + mean(m·CE(p_vit(strong), ŷ))]

ŷ, m: the hard pseudo-label and the confidence mask max p >= τ of the CNN branch's prediction of
the weak view (the unlabelled batch as delivered), made in eval mode without gradient (the
paper's ``pseudo_type=cnn``; ``pseudo=transformer|both`` uses the transformer's or the mean of
the two branches' logits). The strong view is FixMatch's (``ctx.strong_augment`` + CutOut), and
both branches' predictions of it learn from the same ŷ. The fusion modules let each branch's loss
reach the other branch's weights. λ_u is ramped as FixMatch's (``rampup``); the paper's λ_u and
τ (4 and 0.7 for 1000 ImageNet classes) are not ours: see documentation/ssl_methods.md.

Options (``--ssl-opt key=value``): threshold (0.95), lambda (1.0), rampup, cutout (true),
cutout_min / cutout_max (0.05 / 0.25), pseudo (cnn | transformer | both). Which output predicts
is the network's (``predict`` in the plans' ``hybrid_architecture``: both by default).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from autossl.ssl.base import NetworkSpec
from autossl.ssl.context import TrainingContext
from autossl.ssl.methods._shared import check_choice, has_unlabeled, ramp_weight, require_label_maps
from autossl.ssl.methods.fixmatch import FixMatch, confident_pseudo_labels, masked_ce
from autossl.ssl.registry import register

PSEUDO = ("cnn", "transformer", "both")


@contextmanager
def eval_mode(net: torch.nn.Module):
    """The network in eval mode (no drop path) for the pseudo-labelling pass, as the paper's."""
    was = net.training
    net.train(False)
    try:
        yield net
    finally:
        net.train(was)


def pseudo_logits(cnn_logits: torch.Tensor, vit_logits: torch.Tensor, source: str) -> torch.Tensor:
    if source == "cnn":
        return cnn_logits
    if source == "transformer":
        return vit_logits
    return 0.5 * (cnn_logits + vit_logits)


@register("semiformer")
class Semiformer(FixMatch):
    scalars = ("loss_sup_cnn", "loss_sup_vit", "loss_unsup_cnn", "loss_unsup_vit", "pl_confidence", "pl_share",
               "agreement")
    default_unlabeled_ratio = 1.0
    default_cutmix = False  # its own step: FixMatch's strong view with CutOut

    def __init__(self, **options):
        super().__init__(**options)
        self.pseudo = check_choice(self.name, "pseudo", self.option("pseudo", "cnn"), PSEUDO)
        if self.option("network", "cnn") != "cnn":
            raise ValueError("--ssl semiformer trains the CNN and the transformer together in one network; "
                             "--network transformer does not apply")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("semiformer", arch="hybrid")]

    def relative_cost(self, r: float) -> float:
        """Both branches (two networks' work): a weak-view forward over rB, forward + backward over B + rB."""
        return 2 * (r + 3 * (1 + r)) / 3

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["semiformer"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        if use_u:
            weak = unlabeled["data"]
            with torch.no_grad(), ctx.autocast(), eval_mode(net):
                w_cnn, w_vit = net(weak, branches=True)
            labels, mask, conf = confident_pseudo_labels(pseudo_logits(w_cnn, w_vit, self.pseudo), self.threshold)
            x = torch.cat([x_l, self.strong_view(weak, ctx)])
        else:
            x = x_l
        with ctx.autocast():
            out_cnn, out_vit = net(x, branches=True)
        loss_sup_cnn = ctx.supervised_loss(out_cnn[:n_l], labeled["target"])
        loss_sup_vit = ctx.supervised_loss(out_vit[:n_l], labeled["target"])
        loss = loss_sup_cnn + loss_sup_vit
        if use_u:
            loss_unsup_cnn = masked_ce(out_cnn[n_l:], labels, mask)
            loss_unsup_vit = masked_ce(out_vit[n_l:], labels, mask)
            loss = loss + ramp_weight(self.lambda_u, self.rampup, ctx) * (loss_unsup_cnn + loss_unsup_vit)
            ctx.log("loss_unsup_cnn", loss_unsup_cnn)
            ctx.log("loss_unsup_vit", loss_unsup_vit)
            ctx.log("pl_confidence", conf.mean())
            ctx.log("pl_share", mask.mean())
            ctx.log("agreement", (w_cnn.argmax(1) == w_vit.argmax(1)).float().mean())
        ctx.log("loss_sup_cnn", loss_sup_cnn)
        ctx.log("loss_sup_vit", loss_sup_vit)
        yield loss
