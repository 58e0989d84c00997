"""Invariant and Spreading instance features (Ye et al., CVPR 2019): end to end, one encoder;
the batch's first views are the instance weights: view 2 of image i must be recognised as i,
view 1 of any other image j must not, -sum log P(i|x^_i) - sum_{j != i} log(1 - P(i|x_j))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autossl.pretraining.base import PretrainMethod, embedding_std, opt
from autossl.pretraining.registry import register


def invaspread_loss(f: torch.Tensor, f_aug: torch.Tensor, temperature: float) -> torch.Tensor:
    f, f_aug = F.normalize(f.float(), dim=1), F.normalize(f_aug.float(), dim=1)
    n = f.shape[0]
    p_aug = torch.softmax(f_aug @ f.t() / temperature, dim=1)   # row i: P(k | x^_i)
    p_orig = torch.softmax(f @ f.t() / temperature, dim=1)      # row j: P(k | x_j)
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    pos = -torch.log(p_aug[eye].clamp_min(1e-12)).sum()
    neg = -torch.log((1 - p_orig[~eye]).clamp_min(1e-12)).sum()
    return (pos + neg) / n


@register("invaspread")
class InvaSpread(PretrainMethod):
    @classmethod
    def option_names(cls):
        return ("temperature", "dim")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", 0.1)
        self.fc = torch.nn.Linear(self.backbone.out_channels, int(opt(options, "dim", 128)))

    def loss(self, views, ctx):
        f, f_aug = (self.fc(self.backbone(v)) for v in views[:2])
        return invaspread_loss(f, f_aug, self.temperature), {"embedding_std": embedding_std(f)}
