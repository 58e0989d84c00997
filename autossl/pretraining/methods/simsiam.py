"""SimSiam (Chen & He, CVPR 2021): one encoder for both views, a 3-layer projector (BN on its
output), a bottleneck predictor on one side and stop-gradient on the other; symmetric negative
cosine, no momentum encoder, no negatives."""
from __future__ import annotations

from autossl.pretraining.base import PretrainMethod, embedding_std, mlp, opt
from autossl.pretraining.losses import negative_cosine
from autossl.pretraining.registry import register


@register("simsiam")
class SimSiam(PretrainMethod):
    @classmethod
    def option_names(cls):
        return ("dim", "pred_hidden")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        dim = int(opt(options, "dim", 256))
        self.projector = mlp(self.backbone.out_channels, dim, dim, 3, bn_last=True)
        self.predictor = mlp(dim, int(opt(options, "pred_hidden", max(dim // 4, 8))), dim, 2)

    def loss(self, views, ctx):
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))  # z.detach() inside: stop-gradient
        return loss, {"embedding_std": embedding_std(z1)}
