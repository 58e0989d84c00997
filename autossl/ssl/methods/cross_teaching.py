"""Cross teaching between a CNN and a transformer (Luo et al., MIDL 2022; SSL4MIS).

A CNN ("cnn": the plans' ``architecture``) and a transformer ("transformer": the plans'
``transformer_architecture``, Primus / Primus2D) see the same labelled and unlabelled batch:

    L = w_s·L_s(CNN) + w_s·L_s(ViT) + λ(t)·[L_ct(p_cnn(u), ŷ_vit(u)) + L_ct(p_vit(u), ŷ_cnn(u))]

ŷ = hard argmax of the OTHER network, detached. L_s is the backbone's Dice + CE (deep
supervision for the CNN), w_s = 1, exactly the supervised trainer's loss. SSL4MIS uses
0.5·(CE + Dice) with λ_max = 0.1 and L_ct = Dice with the background.

L_ct is Dice over the unlabelled batch, background included (SSL4MIS), on the highest-resolution
output; λ_max = 0.2 (SSL4MIS's ratio of pseudo-label to label terms), ramped:
λ(t) = λ_max·exp(-5(1 - t/T)²), T = ``rampup`` × the semi-supervised phase. Optional (off by
default; measured worse on A2D-3, documentation/ssl_methods.md): CPS-CutMix's views
(``cutmix``: the unlabelled images mixed under a random box, then strongly augmented, each
network's pseudo-labels taken from the unmixed, unaugmented images) and ``ct_loss=dice_ce``
(CE + the foreground Dice over the batch).
No term forces the two networks to agree.

Options (``--ssl-opt key=value``): lambda (0.2), rampup, ct_loss (dice|ce|dice_ce; dice is
SSL4MIS's, background included), cutmix (false), cutmix_min / cutmix_max (0.25 / 0.5), strong
(true with cutmix), sup_weight (1.0; SSL4MIS's exact numbers are sup_weight=0.5
lambda=0.1), clean (true: pseudo-labels cleaned to the largest
component of single-structure classes), predict (cnn|transformer|both; both averages the two
softmaxes; the default is the ``network`` option, i.e. the CNN unless ``autossl_train --network
transformer``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from autossl.components.losses import ce_loss, soft_dice_loss
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.ssl.methods._shared import (check_choice, clean_option, clean_pseudo_labels, cutmix_fraction_option,
                                         cutmix_pseudo_batch, has_unlabeled, pseudo_label_loss, ramp_weight,
                                         rampup_option, split_output)
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
    if name == "dice_ce":  # CE + the foreground Dice over the batch (CPS's pseudo-label loss)
        return lambda logits, pseudo: pseudo_label_loss(logits, pseudo, dice=True)
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
    pretrain_hint = ("cross teaching's transformer starts from scratch. It teaches the CNN better labels after "
                     "'autossl_pretrain DATASET CONFIG --method simmim --network transformer' (and the U-Net "
                     "after '--method mae'), then -pretrained_weights on those folders (measured on A2D-3: "
                     "documentation/ssl_methods.md, cross teaching)")
    scalars = ("loss_sup_cnn", "loss_sup_vit", "loss_ct", "ramp_weight", "agreement")
    default_unlabeled_ratio = 1.0  # SSL4MIS: 8 labelled + 8 unlabelled

    def __init__(self, **options):
        super().__init__(**options)
        # SSL4MIS's weak cross terms (0.2 against our unhalved L_s), Dice with the background, no
        # mixing. CPS-CutMix's recipe (cutmix=true ct_loss=dice_ce lambda=1) lost 5.5 points on
        # A2D-3: the from-scratch transformer's pool pseudo-labels (28 Dice) are far worse than
        # the CNN's (37), and stronger cross terms teach the CNN the transformer's errors
        # (documentation/ssl_methods.md)
        self.lambda_max = self.option("lambda", 0.2)
        if self.lambda_max < 0:
            raise ValueError(f"--ssl cross_teaching: lambda must be >= 0, got {self.lambda_max}")
        self.rampup = rampup_option(self, cold=1.0)
        self.sup_weight = self.option("sup_weight", 1.0)
        self.ct_loss_name = check_choice(self.name, "ct_loss", self.option("ct_loss", "dice"), CT_LOSSES)
        self.ct_loss = ct_loss_fn(self.ct_loss_name)
        # optional: CPS-CutMix's views (each network learns the other's labels of the unmixed,
        # unaugmented images on strongly augmented CutMix views)
        self.cutmix = self.option("cutmix", False)
        self.cutmix_fraction = cutmix_fraction_option(self)
        self.strong = self.option("strong", True) and self.cutmix
        main = check_choice(self.name, "network", self.option("network", "cnn"), ("cnn", "transformer"))
        predict = self.option("predict", self.option("inference", main))
        self.predict = check_choice(self.name, "predict", predict, ("cnn", "transformer", "both"))
        self.clean = clean_option(self)
        if self.sup_weight <= 0:
            raise ValueError(f"--ssl cross_teaching: need sup_weight > 0; got {self.sup_weight}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("cnn", arch="cnn"), NetworkSpec("transformer", arch="transformer")]

    def relative_cost(self, r: float) -> float:
        """CNN and transformer, forward + backward over B + rB each (an equal-cost transformer);
        CutMix adds both networks' forward over the rB unmixed sources (their pseudo-labels)."""
        return (2 * 3 * (1 + r) + (2 * r if self.cutmix else 0)) / 3

    def inference_networks(self) -> list[str]:
        return {"cnn": ["cnn"], "transformer": ["transformer"], "both": ["cnn", "transformer"]}[self.predict]

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        cnn, vit = ctx.networks["cnn"], ctx.networks["transformer"]
        x_l = labeled["data"]
        check_label_map_target(labeled["target"], self.name)
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        pseudo = None
        if use_u and self.cutmix:  # labels of the unmixed images by each network, mixed like the images
            x_u, pseudo = cutmix_pseudo_batch([cnn, vit], unlabeled["data"], x_l, ctx, self.cutmix_fraction,
                                              self.clean, self.strong)
        else:
            x_u = unlabeled["data"] if use_u else x_l[:0]
        x = torch.cat([x_l, x_u])
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
            if pseudo is None:
                l_cnn, l_vit = cross_teaching_terms(m_cnn, m_vit, self.ct_loss,
                                                    lambda y: clean_pseudo_labels(y, ctx, self.clean))
            else:  # the CNN learns the transformer's labels of the sources, and vice versa
                l_cnn, l_vit = self.ct_loss(m_cnn, pseudo[1]), self.ct_loss(m_vit, pseudo[0])
            loss_ct = l_cnn + l_vit
            loss = loss + weight * loss_ct
            ctx.log("loss_ct", loss_ct)
            with torch.no_grad():
                ctx.log("agreement", (m_cnn.argmax(1) == m_vit.argmax(1)).float().mean())
        ctx.log("loss_sup_cnn", loss_sup_cnn)
        ctx.log("loss_sup_vit", loss_sup_vit)
        ctx.log("ramp_weight", weight)
        yield loss
