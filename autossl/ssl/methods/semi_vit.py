"""Semi-ViT (Cai et al., ECCV 2022; code amazon-science/semi-vit): the semi-supervised stage.

Semi-ViT is a pipeline: self-supervised pre-training -> supervised fine-tuning -> semi-supervised
fine-tuning. The first two are the pipeline's own stages (``autossl_pretrain``, a supervised
``autossl_train`` from the pre-trained encoder with ``-pretrained_weights``, or the trainer's
supervised warm start); this method is the third: a student and its EMA teacher, both started
from the supervised network (``-pretrained_weights`` loads it into both; after an in-run warm
start the teacher copies the student), on the transformer by default (the paper's ViT;
``network=cnn`` for the planned U-Net). Per step:

* the teacher predicts the weak view (the unlabelled batch as delivered): probabilities p,
  confidence c = max p and hard pseudo-label ŷ = argmax p per voxel;
* Probabilistic Pseudo Mixup: each strong view (``ctx.strong_augment``) is mixed with another
  sample's, x = λ·x_a + (1-λ)·x_b, λ ~ Beta(α, α) per pair, and its target is the mix of the two
  one-hot pseudo-labels with each source weighted by its confidence, per voxel:
  w_a = λ·c_a / (λ·c_a + (1-λ)·c_b), y = w_a·onehot(ŷ_a) + (1 - w_a)·onehot(ŷ_b)
  (``mix=confidence``: the official code's form, λ = c_a / (c_a + c_b) per voxel for the image
  and the target alike); the mixed voxel counts where max(c_a, c_b) >= τ;
* L = L_s(student, labelled) + λ_u(t)·mean(m · soft-CE(student(x), y)) (``dice=true`` adds the
  soft Dice of the foreground classes over the batch against y on the voxels of m; not in the paper);
* after the step: teacher <- α·teacher + (1-α)·student.

Options (``--ssl-opt key=value``): threshold (0.7), lambda (1.0), rampup, ema_decay (0.99; the paper 0.9999),
alpha (0.8), mix (beta | confidence), dice (false; true: L_u adds the foreground soft Dice against
the mixed targets), network (transformer | cnn), inference (teacher | student).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.components.ema import ema_update, warmup_decay
from autossl.ssl.methods._shared import (check_choice, cpu_generator, has_unlabeled, ramp_weight, rampup_option,
                                         require_label_maps, split_output, supervised_loss_only)
from autossl.ssl.registry import register

MIX = ("beta", "confidence")


def pseudo_mixup_weight(lam, conf_a: torch.Tensor, conf_b: torch.Tensor) -> torch.Tensor:
    """Weight of source a in the mixed target: λ·c_a / (λ·c_a + (1-λ)·c_b) (per voxel)."""
    num = lam * conf_a
    return num / (num + (1 - lam) * conf_b).clamp_min(1e-12)


def partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """Each sample's mixing partner: a random cyclic pairing, never the sample itself (n >= 2)."""
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def probabilistic_pseudo_mixup(x: torch.Tensor, probs: torch.Tensor, partner: torch.Tensor,
                               lam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample of ``x`` (B, C, *) with ``x[partner]``.

    probs: the teacher's softmax (B, K, *) of the same samples (no gradient); lam: (B,) image
    mixing coefficients, or None for the official code's per-voxel λ = c_a / (c_a + c_b).
    Returns (mixed images (B, C, *), soft targets (B, K, *), confidence of the mix max(c_a, c_b)
    (B, 1, *))."""
    probs = probs.detach().float()
    conf, labels = probs.max(1, keepdim=True)
    onehot = F.one_hot(labels[:, 0], probs.shape[1]).movedim(-1, 1).float()
    conf_b, onehot_b = conf[partner], onehot[partner]
    if lam is None:
        w = pseudo_mixup_weight(0.5, conf, conf_b)
        lam_x = w
    else:
        lam_x = lam.to(x.device, torch.float32).view(-1, *([1] * (x.ndim - 1)))
        w = pseudo_mixup_weight(lam_x, conf, conf_b)
    mixed = (lam_x * x.float() + (1 - lam_x) * x[partner].float()).to(x.dtype)
    target = w * onehot + (1 - w) * onehot_b
    return mixed, target, torch.maximum(conf, conf_b)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-Σ_k y_k log softmax(logits)_k per voxel: (B, *spatial)."""
    return -(target * torch.log_softmax(logits.float(), 1)).sum(1)


def soft_target_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          smooth: float = 1e-5) -> torch.Tensor:
    """1 - the soft Dice of the foreground classes over the batch against a probabilistic target
    (B, K, *), on the voxels where ``mask`` (B, 1, *) is 1: the hard pseudo-labels' Dice term
    (``soft_dice_loss``) with the one-hot map replaced by the mixed target."""
    probs = torch.softmax(logits.float(), 1)[:, 1:]
    y, m = target.float()[:, 1:], mask.float()
    axes = (0, *range(2, probs.ndim))
    inter = (probs * y * m).sum(axes)
    dc = (2 * inter + smooth) / ((probs * m).sum(axes) + (y * m).sum(axes) + smooth).clamp_min(1e-8)
    return 1 - dc.mean()


@register("semi_vit")
class SemiViT(SSLMethod):
    scalars = ("loss_sup", "loss_unsup", "pl_confidence", "pl_share", "mix_purity", "ramp_weight")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.threshold = self.option("threshold", 0.7)
        self.lambda_u = self.option("lambda", 1.0)
        self.rampup = rampup_option(self, cold=1.0)
        # 0.99, not the paper's 0.9999 (ImageNet, hundreds of thousands of steps) nor the code's
        # 0.999: after a warm start the teacher begins as the supervised network, and at 0.999 it
        # still held 0.999^500 = 61 % of those weights after A2D-3's 500 semi-supervised steps,
        # a blend that predicted 38.4 mean Dice where its own student reached 49.0
        # (documentation/benchmarks.md, round 7); 0.99 is the mean teacher's decay
        self.ema_decay = self.option("ema_decay", 0.99)
        self.alpha = self.option("alpha", 0.8)
        # ``dice=true`` adds the foreground soft Dice against the mixed targets, as CPS, FixMatch
        # and UCMT learn their hard pseudo-labels. Off by default: on A2D-3 (CNN, seed 0) it lost
        # 4.6 points (43.5 against 48.1): the targets of blended images are blends of two hearts,
        # and the Dice term weighs those ghost structures as much as real ones
        self.dice = self.option("dice", False)
        self.mix = check_choice(self.name, "mix", self.option("mix", "beta"), MIX)
        self.arch = check_choice(self.name, "network", self.option("network", "transformer"), ("transformer", "cnn"))
        self.inference = check_choice(self.name, "inference", self.option("inference", "teacher"),
                                      ("teacher", "student"))
        if not 0 <= self.threshold <= 1 or not 0 <= self.ema_decay < 1 or self.alpha <= 0 or self.lambda_u < 0:
            raise ValueError(f"--ssl semi_vit: need threshold in [0, 1], ema_decay in [0, 1), alpha > 0, lambda >= 0; "
                             f"got {self.threshold}, {self.ema_decay}, {self.alpha}, {self.lambda_u}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student", arch=self.arch),
                NetworkSpec("teacher", arch=self.arch, trainable=False, copy_of="student")]

    def inference_networks(self) -> list[str]:
        return [self.inference]

    def relative_cost(self, r: float) -> float:
        """Teacher forward over rB, student forward + backward over B + rB."""
        return (r + 3 * (1 + r)) / 3

    def mixing_coefficients(self, n: int, ctx: TrainingContext) -> torch.Tensor | None:
        if self.mix == "confidence":
            return None
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=cpu_generator(ctx)).item())
        return torch.from_numpy(np.random.default_rng(seed).beta(self.alpha, self.alpha, n)).float()

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        student = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        if not has_unlabeled(unlabeled):
            yield supervised_loss_only(student, labeled, ctx)
            return
        weak = unlabeled["data"]
        n_u = weak.shape[0]
        with torch.no_grad(), ctx.autocast():
            probs = torch.softmax(main_output(ctx.networks["teacher"](weak)).float(), 1)
        strong = ctx.strong_augment(weak)
        partner = partners(n_u, cpu_generator(ctx)).to(weak.device) if n_u > 1 else \
            torch.zeros(1, dtype=torch.long, device=weak.device)
        lam = self.mixing_coefficients(n_u, ctx)
        mixed, target, conf = probabilistic_pseudo_mixup(strong, probs, partner, lam)
        mask = (conf >= self.threshold).float()
        with ctx.autocast():
            out_l, out_u = split_output(student(torch.cat([x_l, mixed])), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        logits_u = main_output(out_u)
        loss_unsup = (soft_cross_entropy(logits_u, target) * mask[:, 0]).mean()
        if self.dice:
            loss_unsup = loss_unsup + soft_target_dice_loss(logits_u, target, mask)
        weight = ramp_weight(self.lambda_u, self.rampup, ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("pl_confidence", conf.mean())
        ctx.log("pl_share", mask.mean())
        ctx.log("mix_purity", target.max(1).values.mean())
        ctx.log("ramp_weight", weight)
        yield loss_sup + weight * loss_unsup

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        # started from a trained network the teacher follows with its full decay at once; from
        # scratch it tracks the student closely at first (SSL4MIS's min(1 - 1/(t+1), α))
        decay = self.ema_decay if ctx.warm_started else warmup_decay(ctx.ssl_step, self.ema_decay)
        ema_update(ctx.networks["teacher"], [ctx.networks["student"]], decay)
