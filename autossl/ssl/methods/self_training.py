"""Offline self-training (pseudo-labelling in rounds).

The run is split into ``rounds`` (default 2). Round 0 trains on the labelled cases only. At the
end of each round but the last, the unlabelled cases are predicted with the real sliding-window
predictor (``ctx.predict_unlabeled``), turned into hard pseudo-labels (voxels whose max
probability is below ``threshold`` get the ignore label -1) and handed to the unlabelled loader
(``ctx.set_pseudo_labels``). Later rounds train on L_s(labelled) + weight·L_s(pseudo-labelled),
the pseudo-labelled term ignoring -1 voxels. Each round is a whole training: the learning-rate
schedule restarts (warm-up, poly decay) at every round, so the pseudo-labels come from an
annealed model (``restart_lr=false``: one schedule over the run). By default the network
continues from its weights (``reinit=true`` restarts each round from a fresh initialisation, as
in the classic recipe).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from autossl.components.ema import unwrap
from autossl.components.losses import SupervisedLoss
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext
from autossl.ssl.methods._shared import has_unlabeled, require_label_maps, split_output
from autossl.ssl.pseudo_label_cleaning import keep_largest_components
from autossl.ssl.registry import register

IGNORE = -1


def pseudo_label(probabilities, threshold: float, clean_classes: tuple[int, ...] = (),
                 per_slice: bool = False, foreground: tuple[int, ...] = ()) -> tuple[np.ndarray, float, float]:
    """Hard pseudo-label (1, *spatial) int16 from probabilities (C, *spatial); voxels with
    max p < ``threshold`` get -1. The union of the ``foreground`` classes, then every class in
    ``clean_classes``, keeps only its largest connected component of the whole case (of each
    slice along the first spatial axis with ``per_slice``), the rest becoming background, before
    the threshold applies. Returns (label, share of voxels kept, mean max p)."""
    probs = torch.as_tensor(np.asarray(probabilities) if not isinstance(probabilities, torch.Tensor) else probabilities)
    conf, labels = probs.float().max(0, keepdim=True)
    if clean_classes or foreground:
        units = labels.transpose(0, 1) if per_slice else labels[None]  # (units, 1, *spatial)
        units = keep_largest_components(units, clean_classes, foreground=foreground)
        labels = units.transpose(0, 1) if per_slice else units[0]
    keep = conf >= threshold
    labels = torch.where(keep, labels, torch.full_like(labels, IGNORE))
    return labels.to(torch.int16).cpu().numpy(), float(keep.float().mean()), float(conf.mean())


def _pack(seg: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return tuple(seg.shape), zlib.compress(np.ascontiguousarray(seg, dtype=np.int16).tobytes(), 1)


def _unpack(packed) -> np.ndarray:
    shape, data = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.int16).reshape(shape).copy()


class PackedLabels(Mapping):
    """{case: seg} that keeps the labels compressed and unpacks one on access, so that handing
    every unlabelled case's pseudo-label to the loader never holds them all uncompressed."""

    def __init__(self, packed: dict[str, tuple]):
        self.packed = packed

    def __getitem__(self, case: str) -> np.ndarray:
        return _unpack(self.packed[case])

    def __iter__(self):
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)


def reinitialise(net: torch.nn.Module) -> None:
    """Fresh weights: the architecture's own initialiser where it has one (dynamic-network-
    architectures' ``initialize``), else every submodule's ``reset_parameters``."""
    net = unwrap(net)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(net, "initialize"):
        net.apply(net.initialize)


@register("self_training")
class SelfTraining(SSLMethod):
    """Options: rounds (2), threshold (0.9: voxels with max p below it are ignored; 0 keeps all),
    weight (1.0: weight of the pseudo-labelled loss), reinit (false), restart_lr (true: every round
    restarts the learning-rate schedule), chunk (4: unlabelled cases per predictor call), clean
    (false; true: each class the labelled cases show to be one structure keeps its largest
    component, over the whole case)."""

    scalars = ("loss_sup", "loss_unsup", "round", "pl_share", "pl_confidence")
    default_unlabeled_ratio = 1.0
    default_warmup = 0.0  # round 0 is its supervised warm start

    def __init__(self, **options):
        super().__init__(**options)
        self.rounds = self.option("rounds", 2)  # the trainer reads this instance attribute
        # each round a whole training (warm-up and poly decay restart), so pseudo-labels come from
        # an annealed model; false = one schedule over the whole run
        self.restart_lr_each_round = self.option("restart_lr", True)
        self.threshold = self.option("threshold", 0.9)
        self.weight = self.option("weight", 1.0)
        self.reinit = self.option("reinit", False)
        self.chunk = self.option("chunk", 4)
        # ``clean=true``: the pseudo-labels of whole cases keep only the largest component of
        # every class the labelled cases show to be one structure (the other methods' ``clean``).
        # Off by default: on A2D-3 from ``mae`` (seed 0) the row scored 53.0 with it and 56.3
        # without; its over-segmented left ventricle (1.7-2.1 times the volume) is not made of
        # islands (documentation/benchmarks.md, round 8)
        self.clean = self.option("clean", False)
        if self.rounds < 1:
            raise ValueError(f"--ssl self_training: rounds must be >= 1, got {self.rounds}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--ssl self_training: threshold must be in [0, 1], got {self.threshold}")
        self.round = 0
        self.pseudo_loss = SupervisedLoss(ignore_index=IGNORE)
        self._pseudo_labels: dict[str, tuple] = {}
        self._handed_over = False

    def relative_cost(self, r: float) -> float:
        """Round 0 is supervised (1); later rounds make a forward + backward over B + rB. The
        prediction of the unlabelled pool between rounds is counted by the trainer
        (``Trainer.pool_prediction``), not here."""
        later = (self.rounds - 1) / max(1, self.rounds)
        return (1 - later) + later * (1 + r)

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student")]

    def restore_pseudo_labels(self, ctx: TrainingContext) -> None:
        """After a resume: hand the pseudo-labels stored in the checkpoint to the loader again
        (at the first step, when the trainer's loaders exist)."""
        if self._pseudo_labels and not self._handed_over and ctx.set_pseudo_labels is not None:
            ctx.set_pseudo_labels(PackedLabels(self._pseudo_labels))
            self._handed_over = True

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        self.restore_pseudo_labels(ctx)
        net = ctx.networks["student"]
        x_l = labeled["data"]
        use_pl = self.round > 0 and has_unlabeled(unlabeled) and unlabeled.get("target") is not None
        x = torch.cat([x_l, unlabeled["data"]]) if use_pl else x_l
        with ctx.autocast():
            out_l, out_u = split_output(net(x), x_l.shape[0])
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        if use_pl:
            target = unlabeled["target"]
            if isinstance(out_u, list) and not isinstance(target, (list, tuple)):
                out_u = out_u[0]  # a loader without deep-supervision targets: full resolution only
            loss_unsup = self.pseudo_loss(out_u, target)
        else:
            loss_unsup = loss_sup.new_zeros(())
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("round", self.round)
        yield loss_sup + self.weight * loss_unsup

    def on_round_end(self, round_index: int, ctx: TrainingContext) -> None:
        if round_index + 1 >= self.rounds:
            return
        if ctx.predict_unlabeled is None or ctx.set_pseudo_labels is None:
            raise RuntimeError("self_training needs a trainer that provides ctx.predict_unlabeled and ctx.set_pseudo_labels")
        cases = list(ctx.unlabeled_cases)
        if not cases:
            raise RuntimeError("self_training: the dataset has no preprocessed unlabelled cases to pseudo-label")
        packed, shares, confs = {}, [], []
        for i in tqdm(range(0, len(cases), self.chunk), desc=f"pseudo-labels (round {round_index + 1})",
                      unit="chunk", leave=False):
            for case, probs in ctx.predict_unlabeled(cases[i:i + self.chunk]).items():
                seg, share, conf = pseudo_label(probs, self.threshold,
                                                ctx.single_component_classes if self.clean else (),
                                                ctx.single_component_per_slice,
                                                ctx.single_component_foreground if self.clean else ())
                packed[case] = _pack(seg)
                shares.append(share)
                confs.append(conf)
        ctx.log("pl_share", float(np.mean(shares)))
        ctx.log("pl_confidence", float(np.mean(confs)))
        self._pseudo_labels = packed
        ctx.set_pseudo_labels(PackedLabels(packed))
        self._handed_over = True
        self.round = round_index + 1
        if self.reinit:
            for spec in self.network_specs():
                if spec.trainable:
                    reinitialise(ctx.networks[spec.name])

    def state_dict(self) -> dict:
        return {"round": self.round, "pseudo_labels": dict(self._pseudo_labels)}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        self._pseudo_labels = dict(state.get("pseudo_labels", {}))
        self._handed_over = False
