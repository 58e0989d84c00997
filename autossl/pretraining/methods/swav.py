"""SwAV (Caron et al., NeurIPS 2020): projections on the unit sphere scored against K learnt
prototypes; codes from Sinkhorn-Knopp (epsilon 0.05, 3 iterations) of the first two views;
each view predicts the codes of the other view(s) (swapped prediction, softmax at tau 0.1);
prototypes renormalised every step. ``views=N`` adds further views (same size) that only
predict."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autossl.pretraining.base import PretrainMethod, embedding_std, mlp, opt
from autossl.pretraining.losses import sinkhorn
from autossl.pretraining.registry import register


def swapped_prediction(scores: list[torch.Tensor], temperature: float, epsilon: float, iterations: int) -> torch.Tensor:
    loss, terms = 0.0, 0
    for i in range(min(2, len(scores))):
        q = sinkhorn(scores[i].detach(), epsilon, iterations)
        for j, s in enumerate(scores):
            if j == i:
                continue
            loss = loss - (q * F.log_softmax(s.float() / temperature, dim=1)).sum(1).mean()
            terms += 1
    return loss / max(terms, 1)


@register("swav")
class SwAV(PretrainMethod):
    @classmethod
    def option_names(cls):
        return ("temperature", "epsilon", "sinkhorn_iterations", "prototypes", "dim", "hidden", "views")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", 0.1)
        self.epsilon = opt(options, "epsilon", 0.05)
        self.iterations = int(opt(options, "sinkhorn_iterations", 3))
        self.num_views = max(2, int(opt(options, "views", 2)))
        dim = int(opt(options, "dim", 128))
        self.projector = mlp(self.backbone.out_channels, int(opt(options, "hidden", 512)), dim, 2)
        self.prototypes = torch.nn.Linear(dim, int(opt(options, "prototypes", 128)), bias=False)

    def loss(self, views, ctx):
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        zs = [F.normalize(self.projector(self.backbone(v)), dim=1) for v in views]
        scores = [self.prototypes(z) for z in zs]
        loss = swapped_prediction(scores, self.temperature, self.epsilon, self.iterations)
        return loss, {"embedding_std": embedding_std(zs[0])}
