"""PAWS (Assran, Caron, Misra, Bojanowski, Joulin, Ballas & Rabbat, "Semi-Supervised Learning of
Visual Features by Non-Parametrically Predicting View Assignments with Support Samples", ICCV 2021),
per voxel.

A projection head g (an MLP owned by this method) maps the decoder's last features (the input of
the segmentation layer, full resolution) of a voxel to an embedding z. Each step:

* support set: ``support_per_class`` voxels of every class present in the labelled batch (class
  balanced, as PAWS's support mini-batches), embeddings z_s, labels y_s one-hot with label
  smoothing ε = 0.1 (PAWS's code);
* two views of the unlabelled batch (two independent draws of ``ctx.strong_augment``: the same
  geometry, so voxel i of one view is voxel i of the other) and ``anchors`` random voxels per
  image, the same positions in both views;
* soft labels π(z) = Σ_s softmax_s(cos(z, z_s)/τ)·y_s (τ = 0.1); each view's π is trained against
  the sharpened π of the other view, ρ(π) ∝ π^(1/T) with T = 0.25 and no gradient (PAWS's
  symmetric loss), plus ME-max on the mean p̄ of all anchors' π:
  L_paws = ½[H(ρ(π₂), π₁) + H(ρ(π₁), π₂)] + w_me·R(p̄);
* L = L_s(segmentation head, labelled) + λ(t)·L_paws, one forward pass over labelled + both views.

ME-max (changed): PAWS's R(p̄) = -H(p̄) pulls the mean prediction to uniform over the classes,
right for ImageNet's balanced classes and wrong for voxels, most of which are background. R is
KL(p̄ ‖ prior), prior = the labelled batch's class frequencies; ``me_max_prior=uniform`` gives
PAWS's -H(p̄) (KL to uniform up to the constant log C).

The head. The interface lets a method own modules only by hand (as GCT's flaw detector): no
``NetworkSpec`` holds a head on top of another network. The head is built in ``setup`` (its input
width is the segmentation layer's), runs in float32 outside autocast, and is trained by its own
Adam (``head_lr``, poly decay over the semi-supervised phase): its gradients of λ·L_paws are
taken with ``torch.autograd.grad`` before the loss is yielded, so they carry no AMP loss scale,
and applied after the trainer's step (the generator resumes there); under DDP every rank starts
from rank 0's weights and the gradients are averaged. Weights and optimiser state travel in
``state_dict`` for ``--c``.

Prediction: the segmentation head alone (the plain planned network, ``student``). The two heads
share every layer below them; the PAWS term reaches the segmentation only through those shared
features, the head is not needed after training (PAWS's own evaluation, a nearest-neighbour
classifier over a stored support set, would need a predictor that keeps support embeddings).
``agreement`` logs the share of anchors where the two heads' arg-maxes agree.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.components.ema import unwrap
from autossl.ssl.methods._shared import (check_choice, cpu_generator, has_unlabeled, is_distributed, ramp_weight,
                                         rampup_option, require_label_maps, sharpen, split_output,
                                         supervised_loss_only)
from autossl.ssl.registry import register

#: the trainer's gradient clipping (autossl.training.trainer.GRAD_CLIP), applied to the head too
HEAD_GRAD_CLIP = 12.0


# ----------------------------------------------------------------------------- the mechanism
def support_labels(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (S, C) with label smoothing: 1 - ε + ε/C for the class, ε/C elsewhere."""
    return F.one_hot(labels.long(), num_classes).float() * (1 - smoothing) + smoothing / num_classes


def snn(z: torch.Tensor, z_support: torch.Tensor, y_support: torch.Tensor, tau: float) -> torch.Tensor:
    """PAWS's soft nearest-neighbour label π(z) = Σ_s softmax_s(cos(z, z_s)/τ)·y_s, (N, C)."""
    z, zs = F.normalize(z.float(), dim=1), F.normalize(z_support.float(), dim=1)
    return torch.softmax(z @ zs.t() / tau, 1) @ y_support


def paws_ce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(ρ(π₊), π): cross-entropy of the anchors' soft labels (N, C) against the sharpened soft labels
    of the positive view (no gradient), mean over N."""
    target = sharpen(positive.detach(), temperature)
    return -(target * torch.log(anchor.clamp_min(1e-12))).sum(1).mean()


def me_max(probs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """ME-max over a batch of predictions (N, C), p̄ their mean: PAWS's -H(p̄) without a prior,
    KL(p̄ ‖ prior) with one."""
    avg = probs.float().mean(0)
    value = (avg * torch.log(avg.clamp_min(1e-12))).sum()
    if prior is not None:
        value = value - (avg * torch.log(prior.float().clamp_min(1e-12))).sum()
    return value


def sample_support(features: torch.Tensor, target: torch.Tensor, num_classes: int, per_class: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` voxels (drawn with replacement) of each class present in ``target`` (B, 1, *):
    their features (S, K) from ``features`` (B, K, *) and labels (S,). Other labels are skipped."""
    f = features.flatten(2)
    flat = target.reshape(-1).long()
    picked = []
    for c in range(num_classes):
        idx = (flat == c).nonzero().squeeze(1)
        if idx.numel():
            draw = torch.randint(0, idx.numel(), (per_class,), generator=generator).to(idx.device)
            picked.append(idx[draw])
    if not picked:
        return f.new_zeros((0, f.shape[1])), flat.new_zeros((0,))
    idx = torch.cat(picked)
    n_vox = f.shape[2]
    return f[idx // n_vox, :, idx % n_vox], flat[idx]


def gather_voxels(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """features (B, K, *) at positions (B, M) of each sample's flattened voxels -> (B·M, K)."""
    f = features.flatten(2)
    g = torch.gather(f, 2, positions.unsqueeze(1).expand(-1, f.shape[1], -1))
    return g.transpose(1, 2).reshape(-1, f.shape[1])


class ProjectionHead(nn.Module):
    """Linear - ReLU - Linear on feature vectors (N, K) -> (N, dim)."""

    def __init__(self, in_features: int, hidden: int = 128, dim: int = 64):
        super().__init__()
        self.in_features, self.hidden, self.dim = int(in_features), int(hidden), int(dim)
        self.body = nn.Sequential(nn.Linear(self.in_features, self.hidden), nn.ReLU(),
                                  nn.Linear(self.hidden, self.dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.body(f)


@contextmanager
def last_decoder_features(net: nn.Module):
    """Yields a dict whose "f" is, after a forward pass, the output of the decoder's last stage
    (the segmentation layer's input, (B, K, *patch))."""
    decoder = getattr(unwrap(net), "decoder", None)
    if decoder is None or not hasattr(decoder, "stages"):
        raise ValueError(f"--ssl paws: {type(unwrap(net)).__name__} is not a U-Net of the plans (no decoder "
                         f"features for the projection head)")
    captured: dict = {}
    handle = decoder.stages[-1].register_forward_hook(lambda _m, _i, out: captured.__setitem__("f", out))
    try:
        yield captured
    finally:
        handle.remove()


@register("paws")
class PAWS(SSLMethod):
    """Options: lambda (1.0), rampup (1.0 from scratch, 0.1 after a warm start), tau (0.1),
    temperature (0.25), me_max (1.0), me_max_prior (labelled|uniform), label_smoothing (0.1),
    support_per_class (64), anchors (1024 per image), hidden (128), dim (64), head_lr (1e-3)."""

    scalars = ("loss_sup", "loss_paws", "loss_me", "ramp_weight", "pl_confidence", "agreement", "support_classes")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.lambda_max = self.option("lambda", 1.0)
        self.rampup = rampup_option(self, cold=1.0)
        self.tau = self.option("tau", 0.1)
        self.temperature = self.option("temperature", 0.25)
        self.me_max_weight = self.option("me_max", 1.0)
        self.prior = check_choice(self.name, "me_max_prior", self.option("me_max_prior", "labelled"),
                                  ("labelled", "uniform"))
        self.smoothing = self.option("label_smoothing", 0.1)
        self.support_per_class = self.option("support_per_class", 64)
        self.anchors = self.option("anchors", 1024)
        self.hidden = self.option("hidden", 128)
        self.dim = self.option("dim", 64)
        self.head_lr = self.option("head_lr", 1e-3)
        if not (self.tau > 0 and self.temperature > 0 and self.head_lr > 0):
            raise ValueError("--ssl paws: tau, temperature and head_lr must be > 0")
        if not 0 <= self.smoothing < 1 or self.me_max_weight < 0:
            raise ValueError("--ssl paws: label_smoothing must be in [0, 1), me_max >= 0")
        if min(self.support_per_class, self.anchors, self.hidden, self.dim) < 1:
            raise ValueError("--ssl paws: support_per_class, anchors, hidden and dim must be >= 1")
        self.head: ProjectionHead | None = None
        self.head_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict = {}

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student")]

    def relative_cost(self, r: float) -> float:
        """Forward + backward over B + 2rB (two views); the head's passes over a few thousand
        voxels are not counted."""
        return 1 + 2 * r

    # ------------------------------------------------------------------ the head
    def setup(self, ctx: TrainingContext) -> None:
        """Build the head (after a checkpoint was loaded: with its weights)."""
        if self.head is not None:
            return
        seg = getattr(getattr(unwrap(ctx.networks["student"]), "decoder", None), "seg_layers", None)
        if seg is None:
            raise ValueError("--ssl paws needs a U-Net of the plans (a decoder with segmentation layers)")
        in_features = seg[-1].in_channels
        # a fresh head draws its weights from ctx.rng; a resumed one is overwritten by the checkpoint
        seed = 0 if self._pending else int(torch.randint(0, 2 ** 62, (), generator=cpu_generator(ctx)).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = ProjectionHead(in_features, self.hidden, self.dim)
        self.head = head.to(ctx.device)
        if is_distributed():
            for t in self.head.parameters():
                torch.distributed.broadcast(t.data, 0)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=self.head_lr)
        if self._pending:
            got = tuple(self._pending.get(k) for k in ("in_features", "hidden", "dim"))
            if got != (in_features, self.hidden, self.dim):
                raise RuntimeError(f"--ssl paws: the checkpoint's projection head (in_features, hidden, dim) = "
                                   f"{got} does not fit this run's {(in_features, self.hidden, self.dim)}")
            self.head.load_state_dict(self._pending["head"])
            self.head_optimizer.load_state_dict(self._pending["head_optimizer"])
            self._pending = {}

    def _head_step(self, grads: tuple[torch.Tensor, ...], ctx: TrainingContext) -> None:
        params = list(self.head.parameters())
        for p, g in zip(params, grads):  # replaces what the trainer's (loss-scaled) backward left there
            p.grad = g
        if is_distributed():
            ws = torch.distributed.get_world_size()
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= ws
        torch.nn.utils.clip_grad_norm_(params, HEAD_GRAD_CLIP)
        lr = self.head_lr * (1 - min(ctx.ssl_step, ctx.ssl_total_steps) / ctx.ssl_total_steps) ** 0.9
        for group in self.head_optimizer.param_groups:
            group["lr"] = lr
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the step
    def class_prior(self, target: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        if self.prior == "uniform":
            return None
        t = target.reshape(-1).long()
        counts = torch.bincount(t[(t >= 0) & (t < num_classes)], minlength=num_classes).float()
        return counts.clamp_min(1e-3) / counts.clamp_min(1e-3).sum()

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        if not has_unlabeled(unlabeled):
            yield supervised_loss_only(net, labeled, ctx)
            return
        if self.head is None:
            self.setup(ctx)
        x_u = unlabeled["data"]
        n_u = x_u.shape[0]
        views = [ctx.strong_augment(x_u), ctx.strong_augment(x_u)]
        with last_decoder_features(net) as captured, ctx.autocast():
            out = net(torch.cat([x_l] + views))
        feats = captured["f"]
        out_l, _ = split_output(out, n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        ctx.log("loss_sup", loss_sup)
        g = cpu_generator(ctx)
        target = main_target(labeled["target"])
        c = ctx.num_classes
        f_s, y_s = sample_support(feats[:n_l], target, c, self.support_per_class, g)
        if y_s.numel() == 0:  # no voxel of any class in the labelled batch (all ignored)
            yield loss_sup
            return
        n_vox = feats[0, 0].numel()
        positions = torch.randint(0, n_vox, (n_u, self.anchors), generator=g).to(feats.device)
        f_1 = gather_voxels(feats[n_l:n_l + n_u], positions)
        f_2 = gather_voxels(feats[n_l + n_u:], positions)
        with torch.autocast(x_l.device.type, enabled=False):
            z = self.head(torch.cat([f_s, f_1, f_2]).float())
            z_s, z_1, z_2 = z.split([f_s.shape[0], f_1.shape[0], f_2.shape[0]])
            y = support_labels(y_s, c, self.smoothing)
            p_1, p_2 = snn(z_1, z_s, y, self.tau), snn(z_2, z_s, y, self.tau)
            loss_paws = 0.5 * (paws_ce(p_1, p_2, self.temperature) + paws_ce(p_2, p_1, self.temperature))
            loss_me = me_max(torch.cat([p_1, p_2]), self.class_prior(target, c))
            loss = loss_paws + self.me_max_weight * loss_me
        weight = ramp_weight(self.lambda_max, self.rampup, ctx)
        head_grads = torch.autograd.grad(weight * loss, list(self.head.parameters()), retain_graph=True)
        seg_1 = gather_voxels(main_output(out)[n_l:n_l + n_u].detach(), positions)
        ctx.log("loss_paws", loss_paws)
        ctx.log("loss_me", loss_me)
        ctx.log("ramp_weight", weight)
        ctx.log("pl_confidence", p_1.detach().max(1)[0].mean())
        ctx.log("agreement", (seg_1.argmax(1) == p_1.detach().argmax(1)).float().mean())
        ctx.log("support_classes", float(torch.unique(y_s).numel()))
        yield loss_sup + weight * loss
        self._head_step(head_grads, ctx)  # the trainer has stepped the network

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        if self.head is None:
            return dict(self._pending)
        return {"head": self.head.state_dict(), "head_optimizer": self.head_optimizer.state_dict(),
                "in_features": self.head.in_features, "hidden": self.head.hidden, "dim": self.head.dim}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state or {})
        if self.head is not None and self._pending:  # already built: load at once
            self.head.load_state_dict(self._pending["head"])
            self.head_optimizer.load_state_dict(self._pending["head_optimizer"])
            self._pending = {}
