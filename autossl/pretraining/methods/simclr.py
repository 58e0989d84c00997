"""SimCLR (Chen et al., ICML 2020): encoder f + MLP projection g, NT-Xent over the 2N views of
a batch. ``v2=1`` (or ``--method simclr_v2``): SimCLR v2's 3-layer projection head."""
from __future__ import annotations

from autossl.pretraining.base import PretrainMethod, embedding_std, mlp, opt
from autossl.pretraining.losses import nt_xent
from autossl.pretraining.registry import register


@register("simclr")
class SimCLR(PretrainMethod):
    head_layers = 2

    @classmethod
    def option_names(cls):
        return ("temperature", "dim", "hidden", "v2")

    def __init__(self, encoder, **options):
        super().__init__(encoder, **options)
        self.temperature = opt(options, "temperature", 0.5)
        layers = 3 if opt(options, "v2", self.head_layers == 3, bool) else self.head_layers
        self.projector = mlp(self.backbone.out_channels, int(opt(options, "hidden", 512)),
                             int(opt(options, "dim", 128)), layers)

    def loss(self, views, ctx):
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        return nt_xent(z1, z2, self.temperature), {"embedding_std": embedding_std(z1)}


@register("simclr_v2")
class SimCLRv2(SimCLR):
    head_layers = 3
