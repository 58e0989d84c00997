"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004; SSL4MIS's 2D baseline).

L = L_s(labelled) + λ(t) · mean over unlabelled voxels of the normalised entropy
-Σ_c p_c log p_c / log C, with λ(t) = 0.1 · sigmoid ramp-up over the whole run.
"""
from __future__ import annotations

import math

import torch

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import main_output
from autossl.ssl.methods._shared import ramp_weight, rampup_option
from autossl.ssl.registry import register


@register("entropy_min")
class EntropyMinimisation(SSLMethod):
    """Options: lambda (0.1), rampup (1.0, fraction of the run)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight")

    def relative_cost(self, r: float) -> float:
        """Forward + backward over B + rB."""
        return 1 + r

    def network_specs(self):
        return [NetworkSpec("student")]

    def training_step(self, labeled, unlabeled, ctx):
        if labeled["target"][0].shape[1] != 1:
            raise ValueError("--ssl entropy_min needs label maps: region-based datasets have no softmax")
        net = ctx.networks["student"]
        n_l = labeled["data"].shape[0]
        # one forward for both batches; deep-supervision outputs are split along the batch
        with ctx.autocast():
            out = net(torch.cat([labeled["data"], unlabeled["data"]]))
        out_l = [o[:n_l] for o in out] if isinstance(out, (list, tuple)) else out[:n_l]
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        p = torch.softmax(main_output(out)[n_l:].float(), 1)
        entropy = -(p * torch.log(p + 1e-6)).sum(1).mean() / math.log(p.shape[1])
        weight = ramp_weight(self.option("lambda", 0.1), rampup_option(self, cold=1.0), ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", entropy)
        ctx.log("ramp_weight", weight)
        yield loss_sup + weight * entropy
