"""BYOL (Grill et al., NeurIPS 2020): the online network (encoder, projector, predictor)
predicts the target network's projection of the other view; the target is an EMA of the online
encoder + projector (tau from 0.996 to 1, cosine); normalised MSE, symmetric; no negatives."""
from __future__ import annotations

import torch
import torch.nn as nn

from autossl.components.ema import ema_update
from autossl.pretraining.base import PretrainMethod, cosine_momentum, embedding_std, mlp, momentum_copy, opt
from autossl.pretraining.losses import normalized_mse
from autossl.pretraining.registry import register


@register("byol")
class BYOL(PretrainMethod):
    scalars = ("embedding_std", "momentum")

    @classmethod
    def option_names(cls):
        return ("dim", "hidden", "momentum")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.base_momentum = opt(options, "momentum", 0.996)
        dim, hidden = int(opt(options, "dim", 128)), int(opt(options, "hidden", 512))
        self.online = nn.Sequential(self.backbone, mlp(self.backbone.out_channels, hidden, dim, 2))
        self.predictor = mlp(dim, hidden, dim, 2)
        self.target = momentum_copy(self.online)
        self._tau = self.base_momentum

    def loss(self, views, ctx):
        z1, z2 = (self.online(v) for v in views[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            self.target.train(self.training)
            t1, t2 = (self.target(v) for v in views[:2])
        loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)
        return loss, {"embedding_std": embedding_std(z1), "momentum": self._tau}

    def after_step(self, ctx):
        self._tau = cosine_momentum(self.base_momentum, ctx.step + 1, ctx.total_steps)
        ema_update(self.target, [self.online], self._tau)
