"""Losses shared by the methods (each in the form of its paper)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views: for view i its positive is the other view of the same
    image, the 2(N-1) views of the other images are its negatives; cosine similarity / tau,
    the mean over all 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: logits [q.k+, q.negatives] / tau, the positive at index 0. ``q``, ``k``
    (N, d) and ``negatives`` (K, d) normalised here."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    pos = (q * k).sum(1, keepdim=True)
    logits = pos if negatives is None else torch.cat([pos, q @ F.normalize(negatives.float(), dim=1).t()], 1)
    return F.cross_entropy(logits / temperature, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3: keys of the batch, q_i's positive k_i, the other k_j its negatives; scaled by
    2 tau as in the paper's pseudo-code."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * 2 * temperature


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), mean over the batch; z gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, stopgrad(z)) = -cos(p, z), mean over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp: codes Q (B, K) for prototype scores (B, K) with equal mass per
    prototype and per sample; rows sum to 1."""
    q = torch.exp((scores.float() - scores.float().max()) / epsilon).t()  # (K, B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()
