"""``--ssl none``: plain supervised training (nnU-Net v2's recipe), the baseline every
semi-supervised method is compared with. Unlabelled images are not used."""
from __future__ import annotations

from typing import Iterator

import torch

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext
from autossl.ssl.registry import register


@register("none")
class Supervised(SSLMethod):
    """Options: network (cnn | transformer): the architecture of the one "student" network."""

    uses_unlabeled = False
    default_unlabeled_ratio = 0.0
    default_warmup = 0.0

    def __init__(self, **options):
        super().__init__(**options)
        self.arch = self.option("network", "cnn")
        if self.arch not in ("cnn", "transformer"):
            raise ValueError(f"--ssl none: option network must be cnn or transformer, got {self.arch!r}")

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student", arch=self.arch)]

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        with ctx.autocast():
            output = ctx.networks["student"](labeled["data"])
        yield ctx.supervised_loss(output, labeled["target"])
