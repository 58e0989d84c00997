"""UCMT: uncertainty-guided collaborative mean teacher (Shen et al., IJCAI 2023; code Senyh/UCMT).

Two students (same CNN, different initialisation) and their teacher. By default (``teacher=pair``)
the teacher is two EMAs, one per student, updated after every optimiser step with
α = min(1 - 1/(t+1), 0.99), whose softmaxes are averaged. The reference code's teacher
(``teacher=mixed``) is one EMA of 0.99·student1 + 0.01·student2 weights: two differently
initialised networks do not average into a working network, so it is in effect student 1's EMA,
and it taught both students student 1's own false positives. Each iteration has two optimiser
steps (two yielded losses):

1. CMT. Student i sees its own augmented view v_i of the labelled + unlabelled batch, the
   teacher the plain batch. L = L_s(s1) + L_s(s2) + w·λ(t)·(L_x + L_u),
   L_x = L_p(p_s1(u), ŷ_s2(u)) + L_p(p_s2(u), ŷ_s1(u)),
   L_u = L_p(p_s1(u), ŷ_t(u)) + L_p(p_s2(u), ŷ_t(u)), ŷ hard argmax (detached).
   The code averages the two students' terms (½ everywhere); each student has its own optimiser,
   so the sum gives every student exactly the code's balance of terms.
2. UMIX. Uncertainty map of student i = entropy of mean(p_si, p_t) (step-1 predictions).
   ``autossl.ssl.umix.umix`` swaps the k most uncertain blocks of student 1's map with the k
   most certain of student 2's (and vice versa) within each image of student 1's view; the
   labels (labelled images) and the teacher's pseudo-labels (unlabelled) move identically.
   Both students, already updated by step 1, are trained on the mixed batch with the same
   terms (pseudo-labels of L_x recomputed on the mixed images, L_u against the mixed teacher
   pseudo-label).

Defaults (documented with the A2D-3 figures in documentation/ssl_methods.md):
* L_p = CE + the foreground Dice over the batch (``unsup_loss=dice_ce``, CPS's), w = 0.75 after
  a supervised warm start (0.1, the code's, from scratch); ``unsup_loss=dice`` is the code's
  DSCLoss (Dice per sample, background included). L_s is the backbone's Dice + CE with deep
  supervision (the UCMT code uses Dice).
* Views: ``views=strong`` (default) = two draws of the trainer's strong intensity augmentation
  (ctx.strong_augment); ``views=blur`` = two independent draws of the code's 3D augmentation
  (Gaussian blur, p 0.8, σ ~ U(0.1, 2) voxels); ``views=none`` = both students see the batch as
  the loader augmented it (they differ by their initialisation only).
* ``cutmix`` (default): the unlabelled images are CutMix views, each mixed under a random box
  with the next; the teacher predicts the unmixed sources and its probabilities are mixed under
  the same box (the pseudo-labels and UMIX's uncertainty use them).
* ``cross_labels=sources`` (default with CutMix): the pseudo-label each student gives the other
  (L_x) is its prediction of the unaugmented, unmixed sources, mixed under the same box
  (CPS-CutMix's labels); UMIX moves them with the images. ``views`` is the code's: each
  student's argmax of its own (strongly augmented, mixed) view, which on A2D-3 taught the other
  student its augmentation errors.
* Deep supervision for mixed labelled samples: the mixed full-resolution label is downsampled
  to every output scale the way the loader downsamples its targets (``nearest-exact``).
* Grid: 4 blocks per axis (16 in 2D, 64 in 3D) and k = an eighth of the blocks (2 in 2D, 8 in
  3D), so that UMIX moves a quarter of the patch (2k of the blocks). The 3D code's 8 blocks per
  axis with k = 2 move 4 of 512 blocks, under 1 % of the voxels: its second optimiser step is
  then nearly a repeat of the first.
* λ: sigmoid ramp over ``rampup`` of the semi-supervised phase (0.2 from scratch, the 2D code's
  5 of 25 epochs; a tenth after a warm start).

Options: weight, unsup_loss (dice_ce|dice), rampup, ema_decay (0.99), teacher (pair|mixed: one
EMA teacher per student with their softmaxes averaged, or the code's one teacher), teacher_mix
(0.99, student 1's share of the mixed teacher's EMA), grid (0 = auto: 4), topk (0 = auto: an
eighth of the blocks), umix (true), views (strong|blur|none), view_labeled (true: the labelled
images get the views too), cutmix (true), cross_labels (sources|views), cutmix_min / cutmix_max
(0.25 / 0.5), predict (students|teacher: the students' average by default, the code's teacher on
request), network (cnn|transformer: the students' and teacher's architecture;
``autossl_train --network transformer`` sets it), clean (true: the teacher's and the students'
hard pseudo-labels keep only the largest component of the foreground and of each class that the
labelled cases show to be one structure; A2D-3 seed 0 from ``mae``: 71.0 with the foreground
step, 64.5 with the classes alone).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from autossl.components.augmentation.strong import cutmix, gaussian_blur
from autossl.components.ema import ema_update, warmup_decay
from autossl.components.losses import soft_dice_loss
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.ssl.methods._shared import (check_choice, clean_option, clean_pseudo_labels, cpu_generator,
                                         cutmix_fraction_option, cutmix_partners, has_unlabeled, mixed_source_labels,
                                         pseudo_label_loss,
                                         ramp_weight, rampup_option, split_output, warm_default)
from autossl.ssl.methods.cross_teaching import check_label_map_target
from autossl.ssl.registry import register
from autossl.ssl.umix import umix


def ucmt_dice(logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """UCMT's DSCLoss (Dice part): per sample, background included, against a hard label."""
    return soft_dice_loss(logits, pseudo, batch_dice=False, do_bg=True)


def mean_entropy_uncertainty(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """Entropy (B, 1, *spatial) of the mean of two probability maps (UCMT's uncertainty)."""
    m = 0.5 * (p_a + p_b)
    return -(m * torch.log(m + 1e-6)).sum(1, keepdim=True)


def target_pyramid(full: torch.Tensor, like: Any) -> Any:
    """Deep-supervision targets for a full-resolution map, downsampled to every scale of ``like``
    (a list of targets, highest resolution first) exactly as the loader builds its own
    (batchgeneratorsv2's DownsampleSegForDSTransform: ``nearest-exact``, which samples the voxel
    centres 1, 3, 5, ... at half resolution; plain ``nearest`` would take 0, 2, 4, ... and shift
    every lower-resolution label by half a voxel). A single tensor stays as it is."""
    if not isinstance(like, (list, tuple)):
        return full
    out = []
    for t in like:
        if tuple(t.shape[2:]) == tuple(full.shape[2:]):
            out.append(full.to(t.dtype))
        else:
            out.append(F.interpolate(full.float(), size=t.shape[2:], mode="nearest-exact").to(t.dtype))
    return out


def blur_view(x: torch.Tensor, gen: torch.Generator, p: float = 0.8, sigma=(0.1, 2.0)) -> torch.Tensor:
    """The UCMT 3D code's student augmentation: per sample, Gaussian blur with probability ``p``."""
    out = []
    for b in range(x.shape[0]):
        s = float(sigma[0] + (sigma[1] - sigma[0]) * torch.rand((), generator=gen).item())
        if float(torch.rand((), generator=gen).item()) < p:
            out.append(gaussian_blur(x[b].float(), s).to(x.dtype))
        else:
            out.append(x[b])
    return torch.stack(out)


@register("ucmt")
class UCMT(SSLMethod):
    scalars = ("loss_sup", "loss_x", "loss_u", "loss_umix", "ramp_weight", "agreement", "teacher_confidence")
    default_unlabeled_ratio = 1.0  # the code: 4 labelled + 4 unlabelled (3D)
    #: a supervised warm start of 30 % of the run (CPS's), not half: A2D-3 seed 0 gained 12.1
    #: points with it against 7.9 with 0.5 (documentation/benchmarks.md, round 6)
    default_warmup = 0.3

    def __init__(self, **options):
        super().__init__(**options)
        # after the supervised warm start (the default) 0.75: each student's two pseudo-label terms
        # then weigh 1.5 together, CPS's weight; from scratch the code's 0.1
        self.weight = warm_default(self, "weight", cold=0.1, warm=0.75)
        # the students' loss against hard pseudo-labels: CE + the foreground Dice over the batch
        # (CPS's); the code's per-sample Dice with the background (``dice``) made the students
        # over-segment at weight 1 (A2D-3: 2.6 times the right ventricle's volume)
        self.unsup_loss = check_choice(self.name, "unsup_loss", self.option("unsup_loss", "dice_ce"), ("dice_ce", "dice"))
        self.rampup = rampup_option(self, cold=0.2)
        self.ema_decay = self.option("ema_decay", 0.99)
        self.teacher_mix = self.option("teacher_mix", 0.99)
        # ``pair`` (default): one EMA teacher per student, their softmaxes averaged, so that a
        # structure enters the teacher's labels only when both students' EMAs carry it; ``mixed``:
        # the code's one teacher, an EMA of 0.99·student1 + 0.01·student2 weights, in effect
        # student 1's EMA, which hands student 1's own errors back to both students (A2D-3 from
        # ``mae``: 64.5 / 63.2 with ``pair``, 61.4 / 61.9 with ``mixed``; documentation/benchmarks.md)
        self.teacher = check_choice(self.name, "teacher", self.option("teacher", "pair"), ("mixed", "pair"))
        self.grid = self.option("grid", 0)
        self.topk = self.option("topk", 0)
        self.use_umix = self.option("umix", True)
        # the students' views: the strong intensity augmentation by default (the teacher labels the
        # plain batch: FixMatch's weak -> strong); ``blur`` is the 3D code's Gaussian blur
        self.views = check_choice(self.name, "views", self.option("views", "strong"), ("blur", "strong", "none"))
        # the labelled images get the students' views too (the code's); false: they keep the
        # loader's augmentation, as the labelled images of CPS and FixMatch do
        self.view_labeled = self.option("view_labeled", True)
        # the unlabelled images are CutMix views (CPS-CutMix's): mixed under a random box with
        # another image, the teacher's probabilities taken from the unmixed sources and mixed the
        # same way. Without it (A2D-3 seed 0) UCMT's own perturbations, strong views and UMIX,
        # left it level with supervised (+0.9) while CPS-CutMix gained 15 points
        self.cutmix = self.option("cutmix", True)
        self.cutmix_fraction = cutmix_fraction_option(self)
        # the students' labels for each other: their predictions of the unmixed, unaugmented
        # sources (CPS-CutMix's, the default with CutMix) or of their own views (the code's)
        cross = self.option("cross_labels", "sources" if self.cutmix else "views")
        self.cross_labels = check_choice(self.name, "cross_labels", cross, ("sources", "views"))
        if self.cross_labels == "sources" and not self.cutmix:
            raise ValueError("--ssl ucmt: cross_labels=sources needs cutmix=true (the views are then the sources)")
        # inference: the two students averaged (the code predicts with the teacher, in effect
        # student 1's EMA; on A2D-3 seed 0 the students' average was 2.2 points above it on the
        # test set and 3.3 on the pool pseudo-labels, documentation/benchmarks.md)
        predict = self.option("predict", self.option("inference", "students"))
        self.predict = check_choice(self.name, "predict", predict, ("teacher", "students"))
        self.arch = check_choice(self.name, "network", self.option("network", "cnn"), ("cnn", "transformer"))
        self.clean = clean_option(self)
        ranges_ok = 0 <= self.ema_decay <= 1 and 0 <= self.teacher_mix <= 1
        if not ranges_ok or min(self.grid, self.topk) < 0:
            raise ValueError(f"--ssl ucmt: need 0 <= ema_decay, teacher_mix <= 1 and grid, topk >= 0; "
                             f"got ema_decay={self.ema_decay}, teacher_mix={self.teacher_mix}, "
                             f"grid={self.grid}, topk={self.topk}")

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return 2 if self.use_umix else 1

    def relative_cost(self, r: float) -> float:
        """CMT: two students forward + backward over B + rB, teacher forward over B + rB (with
        ``cross_labels=sources`` both students' forward over the rB unmixed sources too); UMIX: two
        students forward + backward over the mixed B + rB."""
        n = 1 + r
        sources = 2 * r if self.cutmix and self.cross_labels == "sources" else 0  # students' forward, sources
        teachers = 2 if self.teacher == "pair" else 1
        return (2 * 3 * n + teachers * n + sources + (2 * 3 * n if self.use_umix else 0)) / 3

    # ----------------------------------------------------------------- networks
    def network_specs(self) -> list[NetworkSpec]:
        specs = [NetworkSpec("student1", arch=self.arch), NetworkSpec("student2", arch=self.arch, seed_offset=1),
                 NetworkSpec("teacher", arch=self.arch, trainable=False, copy_of="student1")]
        if self.teacher == "pair":
            specs.append(NetworkSpec("teacher2", arch=self.arch, trainable=False, copy_of="student2"))
        return specs

    def teacher_names(self) -> list[str]:
        return ["teacher", "teacher2"] if self.teacher == "pair" else ["teacher"]

    def inference_networks(self) -> list[str]:
        return self.teacher_names() if self.predict == "teacher" else ["student1", "student2"]

    def setup(self, ctx: TrainingContext) -> None:
        for name in self.teacher_names():
            for p in ctx.networks[name].parameters():
                p.requires_grad_(False)

    def after_optimizer_step(self, ctx: TrainingContext) -> None:
        n = ctx.networks
        decay = warmup_decay(ctx.ssl_step, self.ema_decay)
        if self.teacher == "pair":
            ema_update(n["teacher"], [n["student1"]], decay)
            ema_update(n["teacher2"], [n["student2"]], decay)
        else:
            ema_update(n["teacher"], [n["student1"], n["student2"]], decay,
                       weights=[self.teacher_mix, 1.0 - self.teacher_mix])

    def teacher_probabilities(self, x: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        """The teacher's softmax of ``x`` (with ``teacher=pair`` the two teachers' softmaxes averaged)."""
        probs = [torch.softmax(main_output(ctx.networks[t](x)).float(), 1) for t in self.teacher_names()]
        return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)

    # ----------------------------------------------------------------- helpers
    def grid_for(self, n_spatial: int) -> int:
        return self.grid if self.grid > 0 else 4

    def topk_for(self, n_spatial: int) -> int:
        """k blocks swapped each way: the option, or an eighth of the grid's blocks (>= 1)."""
        return self.topk if self.topk > 0 else max(1, self.grid_for(n_spatial) ** n_spatial // 8)

    def student_views(self, x: torch.Tensor, ctx: TrainingContext, n_l: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The two students' views of a batch whose first ``n_l`` images are labelled (those stay
        as the loader made them with ``view_labeled=false``)."""
        if self.views == "none":
            return x, x
        if not self.view_labeled and n_l > 0:
            if n_l == x.shape[0]:
                return x, x
            u1, u2 = self.student_views(x[n_l:], ctx)
            return torch.cat([x[:n_l], u1]), torch.cat([x[:n_l], u2])
        if self.views == "strong":
            return ctx.strong_augment(x), ctx.strong_augment(x)
        gen = cpu_generator(ctx)
        return blur_view(x, gen), blur_view(x, gen)

    def _losses(self, out1, out2, target_l, pseudo_t: torch.Tensor | None, n_l: int, ctx: TrainingContext,
                cross: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(L_sup, L_x, L_u, student agreement) for two students' outputs on a labelled + unlabelled
        batch. ``cross``: (student 1's, student 2's) pseudo-labels of the unlabelled part; None: each
        student's argmax of its own output."""
        o1_l, _ = split_output(out1, n_l)
        o2_l, _ = split_output(out2, n_l)
        loss_sup = ctx.supervised_loss(o1_l, target_l) + ctx.supervised_loss(o2_l, target_l)
        if pseudo_t is None:
            zero = loss_sup.new_zeros(())
            return loss_sup, zero, zero, None
        m1, m2 = main_output(out1)[n_l:], main_output(out2)[n_l:]
        if cross is None:
            y1 = clean_pseudo_labels(m1.detach().argmax(1, keepdim=True), ctx, self.clean)
            y2 = clean_pseudo_labels(m2.detach().argmax(1, keepdim=True), ctx, self.clean)
        else:
            y1, y2 = cross
        loss_x = self.pseudo_loss(m1, y2) + self.pseudo_loss(m2, y1)
        loss_u = self.pseudo_loss(m1, pseudo_t) + self.pseudo_loss(m2, pseudo_t)
        agreement = (y1 == y2).float().mean()
        return loss_sup, loss_x, loss_u, agreement

    def pseudo_loss(self, logits: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        if self.unsup_loss == "dice":
            return ucmt_dice(logits, pseudo)
        return pseudo_label_loss(logits, pseudo, dice=True)

    # ----------------------------------------------------------------- training
    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        s1, s2 = ctx.networks["student1"], ctx.networks["student2"]
        x_l, target_l = labeled["data"], labeled["target"]
        check_label_map_target(target_l, self.name)
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        cross = None
        with torch.no_grad(), ctx.autocast():
            if use_u and self.cutmix:  # the teacher sees the unmixed sources; its probabilities are mixed
                pool, partner, box = cutmix_partners(unlabeled["data"], x_l, ctx, self.cutmix_fraction)
                n_u = unlabeled["data"].shape[0]
                x = torch.cat([x_l, cutmix(pool[:n_u], pool[partner], box)])
                p_pool = self.teacher_probabilities(torch.cat([x_l, pool]), ctx)
                p_src = p_pool[n_l:]
                p_t = torch.cat([p_pool[:n_l], cutmix(p_src[:n_u], p_src[partner], box)])
                pseudo_t = mixed_source_labels(p_src, n_u, partner, box, ctx, self.clean)
                if self.cross_labels == "sources":  # each student's labels of the sources, mixed alike
                    cross = tuple(mixed_source_labels(main_output(s(pool)), n_u, partner, box, ctx, self.clean)
                                  for s in (s1, s2))
            else:
                x = torch.cat([x_l, unlabeled["data"]]) if use_u else x_l
                p_t = self.teacher_probabilities(x, ctx)
                pseudo_t = clean_pseudo_labels(p_t[n_l:].argmax(1, keepdim=True), ctx, self.clean) if use_u else None

        # ---- step 1: collaborative mean teacher
        v1, v2 = self.student_views(x, ctx, n_l)
        with ctx.autocast():
            out1, out2 = s1(v1), s2(v2)
        weight = ramp_weight(self.weight, self.rampup, ctx)
        loss_sup, loss_x, loss_u, agreement = self._losses(out1, out2, target_l, pseudo_t, n_l, ctx, cross)
        ctx.log("loss_sup", loss_sup)
        ctx.log("ramp_weight", weight)
        if use_u:
            ctx.log("loss_x", loss_x)
            ctx.log("loss_u", loss_u)
            ctx.log("agreement", agreement)
            ctx.log("teacher_confidence", p_t[n_l:].amax(1).mean())
        with torch.no_grad():
            p1 = torch.softmax(main_output(out1).detach().float(), 1)
            p2 = torch.softmax(main_output(out2).detach().float(), 1)
        del out1, out2
        yield loss_sup + weight * (loss_x + loss_u)

        if not self.use_umix:
            return
        # ---- step 2: UMIX on student 1's view, students updated by step 1
        with torch.no_grad():
            unc1, unc2 = mean_entropy_uncertainty(p1, p_t), mean_entropy_uncertainty(p2, p_t)
            full_target = main_target(target_l).to(torch.long)
            targets = [full_target]
            if use_u:
                targets = [torch.cat([full_target, pseudo_t.to(torch.long)])]
                if cross is not None:  # the cross labels move with the blocks too (labelled part unused)
                    targets += [torch.cat([full_target, y.to(torch.long)]) for y in cross]
            n_sp = x.ndim - 2
            mixed_x, mixed = umix(v1, targets, unc1, unc2, self.grid_for(n_sp), self.topk_for(n_sp))
        with ctx.autocast():
            q1, q2 = s1(mixed_x), s2(mixed_x)
        mixed_t = mixed[0]
        mixed_target_l = target_pyramid(mixed_t[:n_l], target_l)
        mixed_pseudo_t = mixed_t[n_l:] if use_u else None
        mixed_cross = (mixed[1][n_l:], mixed[2][n_l:]) if len(mixed) == 3 else None
        loss_sup2, loss_x2, loss_u2, _ = self._losses(q1, q2, mixed_target_l, mixed_pseudo_t, n_l, ctx, mixed_cross)
        loss_umix = loss_sup2 + weight * (loss_x2 + loss_u2)
        ctx.log("loss_umix", loss_umix)
        yield loss_umix
