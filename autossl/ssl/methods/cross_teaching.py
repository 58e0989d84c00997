"""Cross teaching between a CNN and a transformer (Luo et al., MIDL 2022; SSL4MIS).

A CNN ("cnn": the plans' ``architecture``) and a transformer ("transformer": the plans'
``transformer_architecture``, Primus / Primus2D) see the same labelled and unlabelled batch:

    L = w_s·L_s(CNN) + w_s·L_s(ViT) + λ(t)·[L_ct(p_cnn(u), ŷ_vit(u)) + L_ct(p_vit(u), ŷ_cnn(u))]

ŷ = hard argmax of the OTHER network, detached. L_s is the backbone's Dice + CE (deep
supervision for the CNN), w_s = 1, exactly the supervised trainer's loss, so the CNN's SGD
steps have the supervised baseline's scale. SSL4MIS uses 0.5·(CE + Dice) with λ_max = 0.1;
our default λ_max = 0.2 keeps that ratio of pseudo-label to label terms. L_ct is Dice (SSL4MIS)
over the unlabelled batch, background included, on the highest-resolution output.
λ(t) = λ_max·exp(-5(1 - t/T)²), T = ``rampup`` × the run's steps (SSL4MIS ramps over 200 of its
200 "epochs": the whole run). No term forces the two networks to agree.

Options (``--ssl-opt key=value``): lambda (0.2), rampup (1.0), ct_loss (dice|ce|dice_ce),
sup_weight (1.0; SSL4MIS's exact numbers are sup_weight=0.5 lambda=0.1), clean (true: pseudo-labels
cleaned to the largest component of single-structure classes), predict (cnn|transformer|both; both averages the two softmaxes; the default is
the ``network`` option, i.e. the CNN unless ``autossl_train --network transformer``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from autossl.components.losses import ce_loss, soft_dice_loss
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.ssl.methods._shared import check_choice, clean_option, clean_pseudo_labels, has_unlabeled, ramp_weight, rampup_option, split_output
from autossl.ssl.registry import register

CT_LOSSES = ("dice", "ce", "dice_ce")


def ct_dice(logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """SSL4MIS-style Dice against a hard label: over the whole batch, background included."""
    return soft_dice_loss(logits, pseudo, batch_dice=True, do_bg=True)


def ct_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "dice":
        return ct_dice
    if name == "ce":
        return ce_loss
    if name == "dice_ce":
        return lambda logits, pseudo: ct_dice(logits, pseudo) + ce_loss(logits, pseudo)
    raise ValueError(f"cross_teaching: ct_loss {name!r} must be one of {', '.join(CT_LOSSES)}")


def check_label_map_target(target, method: str) -> None:
    """Hard argmax pseudo-labels need one softmax over classes: label maps (B, 1, *), not regions."""
    t = main_target(target)
    if t.shape[1] != 1:
        raise ValueError(f"--ssl {method}: targets have {t.shape[1]} channels (region-based dataset.json); "
                         f"this method's argmax pseudo-labels need a plain label map (no 'regions')")


def hard_pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) argmax of ``logits``, detached (no gradient flows into the teacher side)."""
    return logits.detach().argmax(1, keepdim=True)


def cross_teaching_terms(logits_cnn: torch.Tensor, logits_vit: torch.Tensor,
                         loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ct_dice,
                         clean: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ct(p_cnn, ŷ_vit), L_ct(p_vit, ŷ_cnn)): each network learns from the other's argmax
    (edited by ``clean``: pseudo-label cleaning)."""
    return (loss(logits_cnn, clean(hard_pseudo_label(logits_vit))),
            loss(logits_vit, clean(hard_pseudo_label(logits_cnn))))


@register("cross_teaching")
class CrossTeaching(SSLMethod):
    scalars = ("loss_sup_cnn", "loss_sup_vit", "loss_ct", "ramp_weight", "agreement")
    default_unlabeled_ratio = 1.0  # SSL4MIS: 8 labelled + 8 unlabelled

    def __init__(self, **options):
        super().__init__(**options)
        self.lambda_max = self.option("lambda", 0.2)
        self.rampup = rampup_option(self, cold=1.0)
        self.sup_weight = self.option("sup_weight", 1.0)
        self.ct_loss_name = check_choice(self.name, "ct_loss", self.option("ct_loss", "dice"), CT_LOSSES)
        self.ct_loss = ct_loss_fn(self.ct_loss_name)
        main = check_choice(self.name, "network", self.option("network", "cnn"), ("cnn", "transformer"))
        predict = self.option("predict", self.option("inference", main))
        self.predict = check_choice(self.name, "predict", predict, ("cnn", "transformer", "both"))
        self.clean = clean_option(self)
        if self.lambda_max < 0 or self.sup_weight <= 0:
            raise ValueError(f"--ssl cross_teaching: need lambda >= 0, sup_weight > 0; got "
                             f"{self.lambda_max}, {self.sup_weight}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("cnn", arch="cnn"), NetworkSpec("transformer", arch="transformer")]

    def relative_cost(self, r: float) -> float:
        """CNN and transformer, forward + backward over B + rB each (an equal-cost transformer)."""
        return 2 * 3 * (1 + r) / 3

    def inference_networks(self) -> list[str]:
        return {"cnn": ["cnn"], "transformer": ["transformer"], "both": ["cnn", "transformer"]}[self.predict]

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        cnn, vit = ctx.networks["cnn"], ctx.networks["transformer"]
        x_l = labeled["data"]
        check_label_map_target(labeled["target"], self.name)
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        x = torch.cat([x_l, unlabeled["data"]]) if use_u else x_l
        with ctx.autocast():  # one forward per network (DDP-safe), labelled + unlabelled together
            out_cnn, out_vit = cnn(x), vit(x)
        cnn_l, _ = split_output(out_cnn, n_l)
        vit_l, _ = split_output(out_vit, n_l)
        loss_sup_cnn = self.sup_weight * ctx.supervised_loss(cnn_l, labeled["target"])
        loss_sup_vit = self.sup_weight * ctx.supervised_loss(vit_l, labeled["target"])
        weight = ramp_weight(self.lambda_max, self.rampup, ctx)
        loss = loss_sup_cnn + loss_sup_vit
        if use_u:
            m_cnn, m_vit = main_output(out_cnn)[n_l:], main_output(out_vit)[n_l:]
            l_cnn, l_vit = cross_teaching_terms(m_cnn, m_vit, self.ct_loss,
                                                lambda y: clean_pseudo_labels(y, ctx, self.clean))
            loss_ct = l_cnn + l_vit
            loss = loss + weight * loss_ct
            ctx.log("loss_ct", loss_ct)
            with torch.no_grad():
                ctx.log("agreement", (m_cnn.argmax(1) == m_vit.argmax(1)).float().mean())
        ctx.log("loss_sup_cnn", loss_sup_cnn)
        ctx.log("loss_sup_vit", loss_sup_vit)
        ctx.log("ramp_weight", weight)
        yield loss
