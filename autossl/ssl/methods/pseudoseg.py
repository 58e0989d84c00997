"""PseudoSeg (Zou, Zhang, Zhang, Li, Bian, Huang & Pfister, "PseudoSeg: Designing Pseudo Labels for
Semantic Segmentation", ICLR 2021), without image-level labels.

FixMatch's scheme (``fixmatch.py``: the weak view makes the pseudo-label, the strong view, the same
geometry with intensity augmentation and CutOut, is trained on it) with PseudoSeg's pseudo-label:
the weak view's decoder logits p fused with a self-attention Grad-CAM map m of the same pass by
the paper's calibrated fusion,

    ỹ = Sharpen(γ·softmax(p / ‖(p, m)‖) + (1 - γ)·softmax(m / ‖(p, m)‖), T),   Sharpen(q, T) ∝ q^(1/T)

‖(p, m)‖ the L2 norm of a voxel's 2C scores, γ = 0.5, T = 0.5; and
L = L_s + λ_u(t)·L_u on the strong view q. ``target=hard`` (the default): L_u = CE + the
foreground Dice over the batch against argmax ỹ (FixMatch's terms here); ``target=soft``: the
paper's soft pixel-wise CE, mean over voxels of -Σ_c ỹ_c log q_c. No confidence threshold by
default, as the paper. Why hard: the normalisation by ‖(p, m)‖ flattens both softmaxes, and on
A2D-3 the fused ỹ had a mean top probability of 0.44 over 4 classes, so the soft CE trained the
network towards that uncertainty (seed 0: -6.0 against supervised, HD95 148 mm from scattered
foreground); the fusion still decides the label.

The CAM branch. The paper takes Grad-CAM from a classification head trained on image-level labels
and refines it with a self-attention module over features. There are no image-level labels here,
so the network's own decoder logits f give the image-level class scores:

1. s_c = Σ_x f_c(x) over the patch (global sum pooling; with the planned 1x1 segmentation layer
   this is an image classifier GAP-then-linear on the decoder's last features, the CAM setting).
2. Grad-CAM of s_c with respect to the output A of one decoder stage: α_ck = mean_x ∂s_c/∂A_k(x),
   m_c = ReLU(Σ_k α_ck A_k), per sample, divided by its maximum. The stage is the finest decoder
   stage but the last with at most ``max_positions`` voxels (1/8 of a 128³ patch, 1/8 of a 512²
   image). Not the last stage: there the logits are linear in A and the Grad-CAM of summed logits
   is the logits themselves (minus the bias), no second opinion.
3. Self-attention refinement, parameter-free: m ← W·m with W_ij = softmax_j(cos(A(i), A(j))/τ_a)
   over the stage's voxels of the sample (the paper learns key and query projections for it);
   normalised to a maximum of 1 again, upsampled linearly to the patch, and multiplied by the
   class's image-level probability max_x p_c(x) (the paper maps the classes its classifier finds
   in the image; here the decoder says which classes the patch holds).

Cost: the weak pass records a graph from that stage up only (the encoder and the decoder below it
run without gradients), then C partial backward passes (one per class) down to the stage, none
into the parameters, and a B·N² affinity for N <= ``max_positions`` voxels.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from autossl.components.ema import unwrap
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.methods._shared import (check_choice, has_unlabeled, ramp_weight, require_label_maps, sharpen,
                                         split_output, supervised_loss_only)
from autossl.ssl.methods.fixmatch import FixMatch, masked_pseudo_label_loss
from autossl.ssl.registry import register


# ----------------------------------------------------------------------------- the mechanism
def calibrated_fusion(logits: torch.Tensor, cam: torch.Tensor, gamma: float = 0.5,
                      temperature: float = 0.5) -> torch.Tensor:
    """PseudoSeg's fusion (B, C, *spatial): Sharpen(γ·softmax(p/N) + (1-γ)·softmax(m/N), T) with
    N = ‖(p, m)‖₂ over the 2C scores of each voxel."""
    p, m = logits.float(), cam.float()
    norm = torch.cat([p, m], 1).norm(dim=1, keepdim=True).clamp_min(1e-6)
    fused = gamma * torch.softmax(p / norm, 1) + (1 - gamma) * torch.softmax(m / norm, 1)
    return sharpen(fused, temperature)


def grad_cam(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of each column of ``scores`` (B, C), differentiable in
    ``features`` (B, K, *s): ReLU(Σ_k α_ck A_k), α_ck = mean over voxels of ∂s_c/∂A_k, per sample
    (samples must not interact: the planned networks normalise per sample). (B, C, *s), float32."""
    a = features.detach().float()
    maps = []
    for c in range(scores.shape[1]):
        (g,) = torch.autograd.grad(scores[:, c].sum(), features, retain_graph=c < scores.shape[1] - 1)
        alpha = g.float().flatten(2).mean(2)
        maps.append(torch.relu(torch.einsum("bk,bk...->b...", alpha, a)))
    return torch.stack(maps, 1)


def max_normalise(cam: torch.Tensor) -> torch.Tensor:
    """Each sample's and class's map divided by its maximum (maps of zeros stay zero)."""
    peak = cam.flatten(2).max(2)[0].clamp_min(1e-6)
    return cam / peak.view(*peak.shape, *([1] * (cam.ndim - 2)))


def attention_refine(cam: torch.Tensor, features: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """m_i <- Σ_j W_ij m_j, W_ij = softmax_j(cos(f_i, f_j)/τ) over the voxels of each sample."""
    f = F.normalize(features.detach().float().flatten(2), dim=1)              # (B, K, N)
    w = torch.softmax(torch.bmm(f.transpose(1, 2), f) / temperature, -1)      # (B, N, N)
    return torch.bmm(cam.flatten(2), w.transpose(1, 2)).view_as(cam)


def cam_stage(net, spatial, max_positions: int) -> int:
    """Index of the decoder stage the CAM is taken at: the finest but the last whose output has at
    most ``max_positions`` voxels (else the coarsest)."""
    decoder, encoder = getattr(net, "decoder", None), getattr(net, "encoder", None)
    if decoder is None or encoder is None or not hasattr(decoder, "stages") or not hasattr(encoder, "strides"):
        raise ValueError(f"--ssl pseudoseg: {type(net).__name__} is not a U-Net of the plans (no decoder stages "
                         f"to take a CAM at)")
    if len(decoder.stages) < 2:
        raise ValueError("--ssl pseudoseg needs a U-Net with at least 3 stages (a decoder stage below the last)")
    sizes, size = [], list(spatial)
    for stride in encoder.strides:
        stride = stride if isinstance(stride, (list, tuple)) else [stride] * len(size)
        size = [max(1, s // k) for s, k in zip(size, stride)]
        sizes.append(size)
    for s in reversed(range(len(decoder.stages) - 1)):  # decoder stage s works at encoder stage n - 2 - s
        if math.prod(sizes[len(sizes) - 2 - s]) <= max_positions:
            return s
    return 0


@register("pseudoseg")
class PseudoSeg(FixMatch):
    """Options: lambda (1.0), rampup (FixMatch's), threshold (0.0: every voxel), gamma (0.5),
    temperature (0.5), attention_temperature (0.1), max_positions (4096), cutout (true),
    cutout_min / cutout_max (0.05 / 0.25), target (hard: CE + Dice against argmax ỹ | soft: the
    paper's soft CE against ỹ)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight", "pl_confidence", "pl_share", "pl_changed")
    default_cutmix = False  # its own step: CE on the strong view with CutOut (the paper's)

    def __init__(self, **options):
        super().__init__(**options)
        self.threshold = self.option("threshold", 0.0)
        self.gamma = self.option("gamma", 0.5)
        self.temperature = self.option("temperature", 0.5)
        self.attention_temperature = self.option("attention_temperature", 0.1)
        self.max_positions = self.option("max_positions", 4096)
        self.target = check_choice(self.name, "target", self.option("target", "hard"), ("hard", "soft"))
        if not 0 <= self.threshold <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError(f"--ssl pseudoseg: threshold and gamma must be in [0, 1], got {self.threshold}, "
                             f"{self.gamma}")
        if not self.temperature > 0 or not self.attention_temperature > 0 or self.max_positions < 1:
            raise ValueError("--ssl pseudoseg: temperature and attention_temperature must be > 0, "
                             "max_positions >= 1")
        self._classes = 2

    def setup(self, ctx: TrainingContext) -> None:
        self._classes = ctx.num_classes

    def relative_cost(self, r: float) -> float:
        """FixMatch's, plus one partial backward per class over the weak batch (counted as a whole
        backward, 2r each: an upper bound)."""
        return super().relative_cost(r) + 2 * self._classes * r / 3

    @torch.no_grad()
    def fuse(self, logits: torch.Tensor, cam: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Steps 2-3 after Grad-CAM: normalise, refine, upsample, gate by presence, fuse."""
        m = max_normalise(attention_refine(max_normalise(cam), features, self.attention_temperature))
        mode = "bilinear" if logits.ndim == 4 else "trilinear"
        m = F.interpolate(m, size=tuple(logits.shape[2:]), mode=mode, align_corners=False)
        presence = torch.softmax(logits.float(), 1).flatten(2).max(2)[0]
        m = m * presence.view(*presence.shape, *([1] * (m.ndim - 2)))
        return calibrated_fusion(logits, m, self.gamma, self.temperature)

    def pseudo_labels(self, net, weak: torch.Tensor, ctx: TrainingContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused soft pseudo-label ỹ, the decoder's logits), both (B, C, *spatial) and detached."""
        module = unwrap(net)
        stage = module.decoder.stages[cam_stage(module, weak.shape[2:], self.max_positions)]
        captured = {}

        def keep(_module, _inputs, output):
            # the pass runs without gradients up to here; from this stage on it records the graph
            # (the no_grad block restores the mode on exit), so that Grad-CAM can go back to A
            torch.set_grad_enabled(True)
            captured["a"] = output.detach().requires_grad_(True)
            return captured["a"]

        handle = stage.register_forward_hook(keep)
        try:
            with torch.no_grad(), ctx.autocast():
                logits = main_output(module(weak))
        finally:
            handle.remove()
        with torch.enable_grad():
            cam = grad_cam(captured["a"], logits.float().flatten(2).sum(2))
        logits = logits.detach()
        return self.fuse(logits, cam, captured["a"]), logits

    def unsup_loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_u of the strong view's ``logits`` against the fused ``target`` ỹ on the voxels of ``mask``."""
        if self.target == "soft":
            ce = -(target * torch.log_softmax(logits.float(), 1)).sum(1, keepdim=True)
            return (ce * mask).mean()
        return masked_pseudo_label_loss(logits, target.argmax(1, keepdim=True), mask, self.dice)

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net = ctx.networks["student"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        if not has_unlabeled(unlabeled):
            yield supervised_loss_only(net, labeled, ctx)
            return
        weak = unlabeled["data"]
        target, logits = self.pseudo_labels(net, weak, ctx)
        conf = target.max(1, keepdim=True)[0]
        mask = (conf >= self.threshold).float()
        with ctx.autocast():
            out_l, out_s = split_output(net(torch.cat([x_l, self.strong_view(weak, ctx)])), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        loss_unsup = self.unsup_loss(main_output(out_s), target, mask)
        weight = ramp_weight(self.lambda_u, self.rampup, ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("ramp_weight", weight)
        ctx.log("pl_confidence", conf.mean())
        ctx.log("pl_share", mask.mean())
        ctx.log("pl_changed", (target.argmax(1) != logits.argmax(1)).float().mean())
        yield loss_sup + weight * loss_unsup
