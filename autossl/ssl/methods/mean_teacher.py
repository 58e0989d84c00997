"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as in SSL4MIS.

A student is trained with L_s on labelled patches plus λ(t)·MSE(softmax student, softmax
teacher) on unlabelled patches, each network seeing its own input noise
n = clamp(N(0, 0.1²), -0.2, 0.2); the teacher is an EMA of the student,
α = min(1 - 1/(t+1), 0.99). The teacher predicts at test time (``inference=student`` to change).

Perturbation: SSL4MIS's U-Net carries dropout and its teacher runs in train mode, so student
and teacher differ by dropout as well as by the input noise. The planned U-Nets have no
dropout, and with input noise alone (clipped at ±0.2 on normalised intensities) the two
predictions barely differ and the consistency term is close to zero. Both networks therefore
carry SSL4MIS's encoder dropout (after the first convolution of each encoder stage, rates
growing with depth; ``NetworkSpec.dropout``, ``networks.build.add_dropout``), scaled to
``dropout`` = 0.2 at the bottleneck (SSL4MIS: 0.5, which kept the CPU preset's U-Net from
learning at our budget), active in the semi-supervised phase only (the supervised warm start
trains the plain network), and the teacher's forward passes run with dropout active
(``teacher_dropout``, true). Prediction uses the plain planned network in eval mode.
``augment=strong`` gives the student's unlabelled images an independent draw of
``ctx.strong_augment`` (intensity only) before the noise, the teacher keeping the loader's
images: a perturbation that the consistency term can measure (FixMatch's weak -> strong).
"""
from __future__ import annotations

from typing import Iterator

import torch

from autossl.components.ema import ema_update, warmup_decay
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods._shared import (check_choice, has_unlabeled, input_noise, ramp_weight, rampup_option,
                                         require_label_maps, split_output)
from autossl.ssl.registry import register


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel, per-class squared difference of the two softmax outputs (B, C, *spatial)."""
    return (torch.softmax(student_logits.float(), 1) - torch.softmax(teacher_logits.float(), 1)) ** 2


@register("mean_teacher")
class MeanTeacher(SSLMethod):
    """Options (``--ssl-opt key=value``): lambda (0.1), rampup (1.0, fraction of the run),
    ema_decay (0.99), noise_std (0.1), noise_clip (0.2), dropout (0.2: the bottleneck's rate),
    teacher_dropout (true), augment (none|strong: the student's unlabelled images get
    ctx.strong_augment), inference (teacher|student)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.lambda_max = self.option("lambda", 0.1)
        self.rampup = rampup_option(self, cold=1.0)
        self.max_decay = self.option("ema_decay", 0.99)
        self.noise_std = self.option("noise_std", 0.1)
        self.noise_clip = self.option("noise_clip", 0.2)
        self.dropout = self.option("dropout", 0.2)
        self.teacher_dropout = self.option("teacher_dropout", True)
        self.augment = check_choice(self.name, "augment", self.option("augment", "none"), ("none", "strong"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--ssl {self.name}: dropout must be in [0, 1), got {self.dropout}")
        self.inference = check_choice(self.name, "inference", self.option("inference", "teacher"), ("teacher", "student"))

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student", dropout=self.dropout),
                NetworkSpec("teacher", trainable=False, copy_of="student", dropout=self.dropout)]

    def setup(self, ctx: TrainingContext) -> None:
        # train mode = dropout active in the teacher's passes (its norms keep no running statistics)
        ctx.networks["teacher"].train(self.teacher_dropout)

    def inference_networks(self) -> list[str]:
        return [self.inference]

    def noisy(self, x: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        return x + input_noise(x, ctx, self.noise_std, self.noise_clip)

    def consistency(self, student_logits: torch.Tensor, x_u: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        """The unsupervised term for the student's unlabelled logits; ``x_u`` is the clean batch."""
        with torch.no_grad(), ctx.autocast():
            teacher_logits = main_output(ctx.networks["teacher"](self.noisy(x_u, ctx)))
        return softmax_mse(student_logits, teacher_logits).mean()

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        student = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        if use_u:
            x_u = ctx.strong_augment(unlabeled["data"]) if self.augment == "strong" else unlabeled["data"]
            x = torch.cat([x_l, self.noisy(x_u, ctx)])
        else:
            x = x_l
        with ctx.autocast():
            out_l, out_u = split_output(student(x), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        weight = ramp_weight(self.lambda_max, self.rampup, ctx)
        loss_unsup = self.consistency(main_output(out_u), unlabeled["data"], ctx) if use_u else loss_sup.new_zeros(())
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("ramp_weight", weight)
        yield loss_sup + weight * loss_unsup

    def relative_cost(self, r: float) -> float:
        """Student forward + backward over B + rB patches, teacher forward over rB."""
        return (3 * (1 + r) + r) / 3

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        ema_update(ctx.networks["teacher"], [ctx.networks["student"]], warmup_decay(ctx.ssl_step, self.max_decay))
