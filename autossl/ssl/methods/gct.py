"""Guided collaborative training, GCT (Ke, Qiu, Wang, Yang & Lau, "Guided Collaborative Training
for Pixel-wise Semi-Supervised Learning", ECCV 2020; official code ZHKKKe/PixelSSL, ``ssl_gct.py``).

Two task networks of the same architecture and different initialisations (``cnn1``, ``cnn2``
with ``seed_offset=1``) see the same labelled + unlabelled batch, and a **flaw detector** D (a
small convolutional network defined in this file) takes the image and a network's softmax p and
predicts where p is wrong: a flaw map in [0, 1], one value per voxel. Per iteration, as the code:

1. Both networks: L_i = L_s(f_i) + λ(t)·(w_dc·L_dc,i + w_fc·L_fc,i), one forward pass each.
   D's maps of the detached predictions, post-processed (clamped at 0, blurred, a map whose
   maximum is at most 0.1 set to 0, min-max normalised per sample: ``handle_flawmap``), decide
   where each network may learn from the other. Values above the threshold τ (0.6) count as 1
   ("both bad" where both maps exceed it). **Dynamic consistency**: network 1 learns from network
   2 only where network 2's flaw is lower, and vice versa:
   L_dc,1 = mean over voxels of [h2 < h1]·Σ_c (p1 - sg(p2))², sg = no gradient (equal flaws: no
   term). **Flaw correction**: where both are bad, each network is pushed to make D see no flaw,
   L_fc,i = mean over voxels of [both bad]·D(x, p_i)², with D's parameters frozen (the gradient
   flows through D into p_i only). Both terms cover the labelled and the unlabelled images.
2. Then D is trained (its own Adam, lr 1e-4, betas (0.9, 0.99), poly decay over the
   semi-supervised phase, as the code) on the labelled images against the flaw target of each
   network's detached prediction: C(mu·Σ_c |onehot(y) - p|) (``flaw_target``), C = Gaussian blur,
   then nu times (3^d dilation, wider blur), min-max normalised per sample; MSE, averaged over
   the two networks.

The flaw detector cannot be a ``NetworkSpec``: the trainer builds only the plans' networks,
whose input is the image's channels, and D reads image + prediction. The method builds it at its
first step (it then knows the channels and the dimension), steps its optimiser itself after the
trainer's step (the generator resumes after its ``yield``), runs it in float32 outside autocast
(it is small; no gradient scaler needed), starts every DDP rank from rank 0's weights and
averages its gradients over the ranks, and keeps its weights and optimiser state in
``state_dict`` (tensors and plain data) for ``--c``.

Defaults follow the code's PASCAL VOC script (``deeplabv2_pascalvoc_1-8_sslgct.py``): τ = 0.6,
w_fc = 1, mu = 0.5, nu = 1, fd_lr = 1e-4, the dc ramp over 3 of 20 epochs (``rampup`` 0.15 from
scratch; 0.1 after a warm start, the package's short ramp). Changed: the dc term sums the squared
difference over classes where the code averages it (``MSELoss``) over VOC's 21 classes with
weight 100; w_dc = 5 ≈ 100/21 keeps the code's per-voxel weight for any number of classes.
Both terms ramp (the code ramps dc only): the trainer's supervised warm start trains the task
networks but not D, which starts untrained in the semi-supervised phase. D is smaller than the
code's (5 strided convolutions up to 512 channels, a batch/instance-norm mix): 4 stride-2 and 2
stride-1 3^d convolutions with ``fd_features`` (16), 32 and 64 channels and instance
normalisation (batch statistics are unreliable with nnU-Net's batches of 2). The blur widths are
fractions of the patch side per axis (the code's kernels are fractions of its 321-pixel crop).

**After a warm start** (the package's default: half the run supervised) dc_weight is 1 and
fc_weight 0 unless given. Measured on A2D-3 (seed 0, documentation/benchmarks.md): with the code's
weights GCT lost 18.3 mean Dice against supervised, 13.0 without the flaw correction, and gained
1.0 with dc_weight 1 and no flaw correction. The task networks enter the semi-supervised phase
fitting the few labelled cases almost perfectly, so D, trained from that point on their
predictions of those cases, learns that flaws sit at the edges of predicted structures; on
unlabelled images the network that predicts less foreground then looks more reliable, the other
learns from it, and correcting towards D pushes both the same way: the predicted structures
shrank to 15-51 % of their true volume (supervised: 48-98 %). From scratch D and the networks
learn together, as in the paper, and the code's weights stay.

Prediction: both networks' softmaxes averaged (``inference=cnn1`` or ``cnn2`` for one).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.ssl.methods._shared import (check_choice, cpu_generator, has_unlabeled, is_distributed, ramp_weight,
                                         rampup_option, require_label_maps, split_output, warm_default)
from autossl.ssl.registry import register


# ----------------------------------------------------------------------------- blur, dilation
def gaussian_blur(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, *spatial) with one σ (voxels) per axis; σ < 0.3 leaves
    that axis as it is. Borders replicate the edge (the code reflects; replicate works for any
    kernel width)."""
    dim = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.3:
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (k / sigma) ** 2)
        k = (k / k.sum()).view(1, 1, *[-1 if a == axis else 1 for a in range(dim)])
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = radius  # F.pad lists the last axis first
        x = conv(F.pad(x, pad, mode="replicate"), k)
    return x


def dilate(x: torch.Tensor) -> torch.Tensor:
    """Grey-value dilation with a 3^d neighbourhood (edges replicated)."""
    dim = x.ndim - 2
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dim - 1]
    return pool(F.pad(x, [1, 1] * dim, mode="replicate"), 3, stride=1)


def _per_sample_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return flat.min(1)[0].view(shape), flat.max(1)[0].view(shape)


def sigmas_for(spatial: tuple[int, ...], fraction: float) -> list[float]:
    """σ per axis: ``fraction`` of the patch side (the code's kernels scale with its crop size)."""
    return [fraction * s for s in spatial]


# ----------------------------------------------------------------------------- GCT's maps and masks
@torch.no_grad()
def flaw_target(probs: torch.Tensor, target: torch.Tensor, *, mu: float = 0.5, blur=None, reblur=None,
                nu: int = 1) -> torch.Tensor:
    """The flaw detector's target (the code's ``FDGTGenerator``): mu·Σ_c |onehot(y) - p| per voxel,
    blurred, then ``nu`` times dilated and blurred again, min-max normalised per sample to [0, 1].
    probs (B, C, *spatial), target (B, 1, *spatial) labels; voxels whose label is not a class
    (an ignore label) count as no flaw."""
    c = probs.shape[1]
    t = target[:, 0].long()
    valid = ((t >= 0) & (t < c)).unsqueeze(1)
    onehot = F.one_hot(t.clamp(0, c - 1), c).movedim(-1, 1).to(probs.dtype)
    diff = mu * (onehot - probs).abs().sum(1, keepdim=True) * valid
    dims = diff.shape[2:]
    diff = gaussian_blur(diff, blur or [0.0] * len(dims))
    for _ in range(nu):
        diff = gaussian_blur(dilate(diff), reblur or [0.0] * len(dims))
    lo, hi = _per_sample_minmax(diff)
    return (diff - lo) / (hi - lo + 1e-9)


@torch.no_grad()
def handle_flawmap(flawmap: torch.Tensor, blur=None, clip: float = 0.1) -> torch.Tensor:
    """The code's ``FlawmapHandler``: negative values to 0, blur, a map whose maximum is at most
    ``clip`` becomes 0 (no flaw anywhere), else min-max normalised per sample."""
    f = gaussian_blur(flawmap.float().clamp_min(0), blur or [0.0] * (flawmap.ndim - 2))
    lo, hi = _per_sample_minmax(f)
    return torch.where(hi > clip, (f - lo) / (hi - lo + 1e-9), torch.zeros_like(f))


@torch.no_grad()
def dynamic_consistency_masks(h1: torch.Tensor, h2: torch.Tensor, threshold: float):
    """The code's ``DCGTGenerator`` as masks (B, 1, *spatial): flaws above ``threshold`` count as
    1; network 1 learns from network 2 where h2 < h1, network 2 from network 1 where h1 < h2.
    Returns (learn1, learn2, both_bad)."""
    bad1, bad2 = h1 > threshold, h2 > threshold
    g1 = torch.where(bad1, torch.ones_like(h1), h1)
    g2 = torch.where(bad2, torch.ones_like(h2), h2)
    return (g2 < g1).float(), (g1 < g2).float(), (bad1 & bad2).float()


def dc_loss(p: torch.Tensor, other: torch.Tensor, learn: torch.Tensor) -> torch.Tensor:
    """mean over batch and voxels of learn·Σ_c (p - sg(other))²."""
    return (learn * ((p - other.detach()) ** 2).sum(1, keepdim=True)).mean()


def fc_loss(flawmap: torch.Tensor, both_bad: torch.Tensor) -> torch.Tensor:
    """mean over batch and voxels of both_bad·D(x, p)² (D's target 0: no flaw)."""
    return (both_bad * flawmap ** 2).mean()


# ----------------------------------------------------------------------------- the flaw detector
class FlawDetector(nn.Module):
    """D(image, softmax) -> flaw map (B, 1, *spatial), unactivated (as the code; MSE against
    targets in [0, 1]). 2D or 3D; any patch size (stride-2 convolutions, then linear
    interpolation back to the input size)."""

    def __init__(self, in_channels: int, dim: int, features: int = 16):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"FlawDetector: 2D or 3D inputs, got {dim}D")
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        f = int(features)
        chans = [(in_channels, f, 2), (f, 2 * f, 2), (2 * f, 2 * f, 1), (2 * f, 4 * f, 2), (4 * f, 4 * f, 1)]
        layers: list[nn.Module] = []
        for i, (a, b, s) in enumerate(chans):
            layers.append(conv(a, b, 3, stride=s, padding=1))
            if i > 0:  # instance normalisation (GroupNorm with one group per channel works on 1 voxel too)
                layers.append(nn.GroupNorm(b, b))
            layers.append(nn.LeakyReLU(0.2))
        layers.append(conv(4 * f, 1, 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.dim = dim
        self.in_channels = in_channels

    def forward(self, image: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        y = self.body(torch.cat([image, probs], 1))
        mode = "bilinear" if self.dim == 2 else "trilinear"
        return F.interpolate(y, size=tuple(image.shape[2:]), mode=mode, align_corners=True)


@register("gct")
class GCT(SSLMethod):
    """Options: dc_weight (5.0 from scratch, 1.0 after a warm start), fc_weight (1.0 from scratch, 0
    after a warm start), threshold (0.6), rampup (0.15 from scratch, 0.1
    after a warm start), fd_lr (1e-4), fd_features (16), mu (0.5), nu (1), fd_blur (0.02),
    fd_reblur (0.04), flaw_blur (0.011: fractions of the patch side), flaw_clip (0.1),
    inference (both|cnn1|cnn2)."""

    scalars = ("loss_sup", "loss_dc", "loss_fc", "loss_fd", "ramp_weight", "agreement", "dc_share")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        # after a warm start D starts untrained while the task networks already fit the labelled
        # cases: the code's weights shrank every structure on A2D-3 (module docstring)
        self.dc_weight = warm_default(self, "dc_weight", cold=5.0, warm=1.0)
        self.fc_weight = warm_default(self, "fc_weight", cold=1.0, warm=0.0)
        self.threshold = self.option("threshold", 0.6)
        self.rampup = rampup_option(self, cold=0.15)
        self.fd_lr = self.option("fd_lr", 1e-4)
        self.fd_features = self.option("fd_features", 16)
        self.mu = self.option("mu", 0.5)
        self.nu = self.option("nu", 1)
        self.fd_blur = self.option("fd_blur", 0.02)
        self.fd_reblur = self.option("fd_reblur", 0.04)
        self.flaw_blur = self.option("flaw_blur", 0.011)
        self.flaw_clip = self.option("flaw_clip", 0.1)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--ssl gct: threshold must be in [0, 1] (normalised flaw maps), got {self.threshold}")
        if not self.fd_lr > 0:
            raise ValueError(f"--ssl gct: fd_lr must be > 0, got {self.fd_lr}")
        if self.fd_features < 1:
            raise ValueError(f"--ssl gct: fd_features must be >= 1, got {self.fd_features}")
        if not 0 < self.mu <= 1:
            raise ValueError(f"--ssl gct: mu must be in (0, 1], got {self.mu}")
        if self.nu < 0:
            raise ValueError(f"--ssl gct: nu must be >= 0, got {self.nu}")
        if min(self.fd_blur, self.fd_reblur, self.flaw_blur) < 0:
            raise ValueError("--ssl gct: fd_blur, fd_reblur and flaw_blur must be >= 0 (fractions of the patch side)")
        if not 0 <= self.flaw_clip < 1:
            raise ValueError(f"--ssl gct: flaw_clip must be in [0, 1), got {self.flaw_clip}")
        self.inference = check_choice(self.name, "inference", self.option("inference", "both"),
                                      ("both", "cnn1", "cnn2"))
        self.fd: FlawDetector | None = None
        self.fd_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict = {}

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("cnn1"), NetworkSpec("cnn2", seed_offset=1)]

    def inference_networks(self) -> list[str]:
        return ["cnn1", "cnn2"] if self.inference == "both" else [self.inference]

    def relative_cost(self, r: float) -> float:
        """Two networks, forward + backward over B + rB; the flaw detector's passes (a few
        convolutions from half resolution down) are not counted."""
        return 2 * (1 + r)

    # ------------------------------------------------------------------ the flaw detector
    def detector(self, x: torch.Tensor, ctx: TrainingContext) -> FlawDetector:
        """D, built at the first step (its input: the image channels + the classes) with weights
        drawn from ``ctx.rng`` (the global random state is left alone)."""
        if self.fd is None:
            in_channels, dim = x.shape[1] + ctx.num_classes, x.ndim - 2
            seed = int(torch.randint(0, 2 ** 62, (), generator=cpu_generator(ctx)).item())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fd = FlawDetector(in_channels, dim, self.fd_features)
            self.fd = fd.to(x.device)
            if is_distributed():  # ctx.rng differs per rank: every rank starts from rank 0's weights
                for t in self.fd.parameters():
                    torch.distributed.broadcast(t.data, 0)
            self.fd_optimizer = torch.optim.Adam(self.fd.parameters(), lr=self.fd_lr, betas=(0.9, 0.99))
            if self._pending:
                got = (self._pending.get("in_channels"), self._pending.get("dim"), self._pending.get("features"))
                if got != (in_channels, dim, self.fd_features):
                    raise RuntimeError(f"--ssl gct: the checkpoint's flaw detector (in_channels, dim, features) = "
                                       f"{got} does not fit this run's {(in_channels, dim, self.fd_features)}")
                self.fd.load_state_dict(self._pending["fd"])
                self.fd_optimizer.load_state_dict(self._pending["fd_optimizer"])
                self._pending = {}
        return self.fd

    def _fd_step(self, loss: torch.Tensor, ctx: TrainingContext) -> None:
        self.fd_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if is_distributed():  # one flaw detector for all ranks: average its gradients
            ws = torch.distributed.get_world_size()
            for p in self.fd.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= ws
        lr = self.fd_lr * (1 - min(ctx.ssl_step, ctx.ssl_total_steps) / ctx.ssl_total_steps) ** 0.9
        for group in self.fd_optimizer.param_groups:
            group["lr"] = lr
        self.fd_optimizer.step()

    # ------------------------------------------------------------------ the step
    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        net1, net2 = ctx.networks["cnn1"], ctx.networks["cnn2"]
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        x = torch.cat([x_l, unlabeled["data"]]) if has_unlabeled(unlabeled) else x_l
        with ctx.autocast():
            out1, out2 = net1(x), net2(x)
        out1_l, _ = split_output(out1, n_l)
        out2_l, _ = split_output(out2, n_l)
        loss_sup = ctx.supervised_loss(out1_l, labeled["target"]) + ctx.supervised_loss(out2_l, labeled["target"])
        p1 = torch.softmax(main_output(out1).float(), 1)
        p2 = torch.softmax(main_output(out2).float(), 1)
        fd = self.detector(x, ctx)
        xf = x.float()
        spatial = tuple(x.shape[2:])
        with torch.autocast(x.device.type, enabled=False):
            # D on the detached predictions: its training (labelled part, after the yield) and the guidance
            f1, f2 = fd(xf, p1.detach()), fd(xf, p2.detach())
            h1 = handle_flawmap(f1.detach(), sigmas_for(spatial, self.flaw_blur), self.flaw_clip)
            h2 = handle_flawmap(f2.detach(), sigmas_for(spatial, self.flaw_blur), self.flaw_clip)
            learn1, learn2, both_bad = dynamic_consistency_masks(h1, h2, self.threshold)
            w_dc = ramp_weight(self.dc_weight, self.rampup, ctx)
            w_fc = ramp_weight(self.fc_weight, self.rampup, ctx)
            loss_fc = p1.new_zeros(())
            if w_fc > 0:
                # flaw correction: D frozen (a detached copy of its parameters, so that D's own step
                # after the yield cannot touch what this graph saved); the gradient reaches each p
                frozen = {k: v.detach().clone() for k, v in fd.named_parameters()}
                g1 = functional_call(fd, frozen, (xf, p1))
                g2 = functional_call(fd, frozen, (xf, p2))
                loss_fc = fc_loss(g1, both_bad) + fc_loss(g2, both_bad)
        loss_dc = dc_loss(p1, p2, learn1) + dc_loss(p2, p1, learn2)
        weight = ramp_weight(1.0, self.rampup, ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_dc", loss_dc)
        ctx.log("loss_fc", loss_fc)
        ctx.log("ramp_weight", weight)
        ctx.log("agreement", (p1[n_l:].argmax(1) == p2[n_l:].argmax(1)).float().mean() if x.shape[0] > n_l
                else (p1.argmax(1) == p2.argmax(1)).float().mean())
        ctx.log("dc_share", (learn1 + learn2).mean())
        yield loss_sup + w_dc * loss_dc + w_fc * loss_fc
        # both networks have stepped: D's step on the labelled images (the code's step 2)
        target = main_target(labeled["target"])
        blur, reblur = sigmas_for(spatial, self.fd_blur), sigmas_for(spatial, self.fd_reblur)
        with torch.autocast(x.device.type, enabled=False):
            gt1 = flaw_target(p1[:n_l].detach(), target, mu=self.mu, blur=blur, reblur=reblur, nu=self.nu)
            gt2 = flaw_target(p2[:n_l].detach(), target, mu=self.mu, blur=blur, reblur=reblur, nu=self.nu)
            loss_fd = (F.mse_loss(f1[:n_l], gt1) + F.mse_loss(f2[:n_l], gt2)) / 2
            self._fd_step(loss_fd, ctx)
        ctx.log("loss_fd", loss_fd)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        if self.fd is None:
            return dict(self._pending)
        return {"fd": self.fd.state_dict(), "fd_optimizer": self.fd_optimizer.state_dict(),
                "in_channels": self.fd.in_channels, "dim": self.fd.dim, "features": self.fd_features}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state or {})
        if self.fd is not None and self._pending:  # already built: load at once
            self.fd.load_state_dict(self._pending["fd"])
            self.fd_optimizer.load_state_dict(self._pending["fd_optimizer"])
            self._pending = {}
