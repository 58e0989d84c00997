"""MoCo (He et al., CVPR 2020), MoCo v2 (Chen et al., 2020), MoCo v3 (Chen et al., ICCV 2021).

v1/v2: a query encoder and a momentum key encoder (EMA of the query encoder, m = 0.999);
InfoNCE of the query against its key and a queue of earlier keys (FIFO: this step's keys
replace the oldest). v1 projects with one linear layer (tau 0.07), v2 with SimCLR's 2-layer MLP
(tau 0.2). v3: no queue; a projector and a predictor on the query side, keys of the batch
(in-batch InfoNCE), symmetric over the two views, m from 0.99 to 1 on a cosine schedule.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from autossl.components.ema import ema_update
from autossl.pretraining.base import PretrainMethod, cosine_momentum, embedding_std, mlp, momentum_copy, opt
from autossl.pretraining.losses import in_batch_info_nce, info_nce
from autossl.pretraining.registry import register


class _MoCoQueue(PretrainMethod):
    mlp_head = True
    default_temperature = 0.2

    @classmethod
    def option_names(cls):
        return ("temperature", "dim", "hidden", "queue", "momentum")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", self.default_temperature)
        self.momentum = opt(options, "momentum", 0.999)
        dim = int(opt(options, "dim", 128))
        c = self.backbone.out_channels
        head = mlp(c, int(opt(options, "hidden", 512)), dim, 2) if self.mlp_head else nn.Linear(c, dim)
        self.query = nn.Sequential(self.backbone, head)
        self.key = momentum_copy(self.query)
        size = int(opt(options, "queue", 4096))
        if size < 1:
            raise ValueError("--method-opt queue must be >= 1")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` over the oldest entries (wrapping round the end)."""
        n, size = keys.shape[0], self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx[-size:]] = F.normalize(keys[-size:].float(), dim=1).to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def loss(self, views, ctx):
        q = self.query(views[0])
        with torch.no_grad():
            self.key.train(self.training)
            k = self.key(views[1])
        self._pending = k.detach()
        return info_nce(q, k, self.queue.clone().detach(), self.temperature), {"embedding_std": embedding_std(q)}

    def after_step(self, ctx):
        ema_update(self.key, [self.query], self.momentum)
        if self._pending is not None:
            self.enqueue(self._pending)
            self._pending = None


@register("moco_v1")
class MoCoV1(_MoCoQueue):
    mlp_head = False
    default_temperature = 0.07


@register("moco_v2")
class MoCoV2(_MoCoQueue):
    mlp_head = True
    default_temperature = 0.2


@register("moco_v3")
class MoCoV3(PretrainMethod):
    @classmethod
    def option_names(cls):
        return ("temperature", "dim", "hidden", "momentum")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", 0.2)
        self.base_momentum = opt(options, "momentum", 0.99)
        dim, hidden = int(opt(options, "dim", 128)), int(opt(options, "hidden", 512))
        self.online = nn.Sequential(self.backbone, mlp(self.backbone.out_channels, hidden, dim, 3, bn_last=True))
        self.predictor = mlp(dim, hidden, dim, 2)
        self.target = momentum_copy(self.online)

    def loss(self, views, ctx):
        q1, q2 = (self.predictor(self.online(v)) for v in views[:2])
        with torch.no_grad():
            self.target.train(self.training)
            k1, k2 = (self.target(v) for v in views[:2])
        loss = in_batch_info_nce(q1, k2, self.temperature) + in_batch_info_nce(q2, k1, self.temperature)
        return loss, {"embedding_std": embedding_std(q1)}

    def after_step(self, ctx):
        ema_update(self.target, [self.online], cosine_momentum(self.base_momentum, ctx.step + 1, ctx.total_steps))
