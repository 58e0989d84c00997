"""Instance discrimination (Wu et al., CVPR 2018): every image its own class; a memory bank of
every image's normalised 128-d feature; NCE against m negatives drawn uniformly from the bank
with the partition function Z estimated once from the first batch (Monte Carlo); the bank
entry of a seen image moves towards its new feature (proximal momentum 0.5). One view per
sample; an image is a preprocessed case (a 2D configuration's slices share their case's entry).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autossl.pretraining.base import PretrainMethod, embedding_std, opt
from autossl.pretraining.registry import register


def nce_loss(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, neg_idx: torch.Tensor, temperature: float,
             z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, exp-scores) of NCE: h = P / (P + m Pn), Pn = 1/n, P = exp(v.w / tau) / Z."""
    n, m = bank.shape[0], neg_idx.shape[1]
    w = bank[torch.cat([idx[:, None], neg_idx], 1)]                  # (B, 1 + m, d)
    e = torch.exp(torch.einsum("bkd,bd->bk", w, v) / temperature)   # (B, 1 + m)
    p = e / z
    h = p / (p + m / n)
    loss = -(torch.log(h[:, 0].clamp_min(1e-12)) + torch.log((1 - h[:, 1:]).clamp_min(1e-12)).sum(1)).mean()
    return loss, e


@register("instdisc")
class InstDisc(PretrainMethod):
    num_views = 1

    @classmethod
    def option_names(cls):
        return ("temperature", "dim", "negatives", "bank_momentum")

    def __init__(self, encoder, num_samples: int = 1, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", 0.07)
        self.negatives = int(opt(options, "negatives", 4096))
        self.bank_momentum = opt(options, "bank_momentum", 0.5)
        dim = int(opt(options, "dim", 128))
        self.fc = torch.nn.Linear(self.backbone.out_channels, dim)
        self.register_buffer("bank", F.normalize(torch.randn(max(1, num_samples), dim), dim=1))
        self.register_buffer("z", torch.tensor(-1.0))
        self._pending = None

    def loss(self, views, ctx):
        if ctx.indices is None:
            raise RuntimeError("instdisc needs the dataset index of every sample")
        v = F.normalize(self.fc(self.backbone(views[0])).float(), dim=1)
        idx = ctx.indices.to(v.device)
        neg = torch.randint(0, self.bank.shape[0], (v.shape[0], self.negatives), device=v.device)
        if float(self.z) < 0:  # Z once, from the first batch
            with torch.no_grad():
                e = torch.exp(self.bank[neg] @ v.detach()[:, :, None] / self.temperature)
                self.z.fill_(float(e.mean()) * self.bank.shape[0])
        loss, _ = nce_loss(v, self.bank.clone(), idx, neg, self.temperature, float(self.z))
        self._pending = (idx, v.detach())
        return loss, {"embedding_std": embedding_std(v)}

    @torch.no_grad()
    def after_step(self, ctx):
        if self._pending is None:
            return
        idx, v = self._pending
        new = self.bank[idx] * self.bank_momentum + v * (1 - self.bank_momentum)
        self.bank[idx] = F.normalize(new, dim=1)
        self._pending = None
