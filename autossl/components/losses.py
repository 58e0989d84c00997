"""Segmentation losses: nnU-Net v2's Dice + CE (ignore-label aware) and deep supervision.

Targets are integer maps (B, 1, *spatial); ``ignore_index`` voxels contribute to neither term.
Semi-supervised methods use the same functions with hard pseudo-labels as targets, and
``mask`` (B, 1, *spatial, float in [0, 1]) to weight voxels (confidence thresholds).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    t = target[:, 0].long().clamp(min=0, max=num_classes - 1)
    return F.one_hot(t, num_classes).movedim(-1, 1).to(torch.float32)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = False, do_bg: bool = False,
                   smooth: float = 1e-5, mask: torch.Tensor | None = None, ignore_index: int | None = None,
                   probabilities: bool = False) -> torch.Tensor:
    """1 - soft Dice (nnU-Net's MemoryEfficientSoftDiceLoss): mean over classes (and samples
    unless ``batch_dice``), background excluded unless ``do_bg``."""
    probs = logits.float() if probabilities else torch.softmax(logits.float(), 1)
    c = probs.shape[1]
    weight = torch.ones_like(target, dtype=torch.float32)
    if ignore_index is not None:
        weight = weight * (target != ignore_index).float()
    if mask is not None:
        weight = weight * mask.float()
    onehot = _onehot(target, c)
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, probs.ndim))
    inter = (probs * onehot * weight).sum(axes)
    pred = (probs * weight).sum(axes)
    gt = (onehot * weight).sum(axes)
    if batch_dice:
        inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
    dc = (2 * inter + smooth) / (pred + gt + smooth).clamp_min(1e-8)
    return 1 - dc.mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None,
            ignore_index: int | None = None) -> torch.Tensor:
    """Cross-entropy against an integer map; ``mask`` weights voxels (mean over weighted voxels)."""
    t = target[:, 0].long()
    if ignore_index is not None:
        valid = t != ignore_index
        t = torch.where(valid, t, torch.zeros_like(t))
    else:
        valid = torch.ones_like(t, dtype=torch.bool)
    per_voxel = F.cross_entropy(logits.float(), t, reduction="none")
    w = valid.float()
    if mask is not None:
        w = w * mask[:, 0].float()
    return (per_voxel * w).sum() / w.sum().clamp_min(1.0)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = False,
                 ignore_index: int | None = None, mask: torch.Tensor | None = None,
                 weight_ce: float = 1.0, weight_dice: float = 1.0) -> torch.Tensor:
    """nnU-Net's DC_and_CE_loss (weights 1/1)."""
    return weight_ce * ce_loss(logits, target, mask=mask, ignore_index=ignore_index) + weight_dice * soft_dice_loss(
        logits, target, batch_dice=batch_dice, ignore_index=ignore_index, mask=mask)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """1/2^i, lowest resolution set to 0, normalised (nnU-Net v2)."""
    w = [1 / (2 ** i) for i in range(n_outputs)]
    if n_outputs > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


class SupervisedLoss:
    """L_s for any network: deep-supervision outputs (list, high -> low resolution) are weighted
    against the matching target scales; a single output is compared with the full-resolution target."""

    def __init__(self, batch_dice: bool = False, ignore_index: int | None = None):
        self.batch_dice = batch_dice
        self.ignore_index = ignore_index

    def __call__(self, output, target, mask: torch.Tensor | None = None) -> torch.Tensor:
        targets: Sequence[torch.Tensor] = target if isinstance(target, (list, tuple)) else [target]
        if not isinstance(output, (list, tuple)):
            return dice_ce_loss(output, targets[0], batch_dice=self.batch_dice, ignore_index=self.ignore_index, mask=mask)
        if len(targets) < len(output):
            raise ValueError(f"{len(output)} deep-supervision outputs but {len(targets)} target scales")
        weights = deep_supervision_weights(len(output))
        total = 0.0
        for w, o, t in zip(weights, output, targets):
            if w == 0:
                continue
            m = None
            if mask is not None:
                # the loader's own target downsampling (nearest-exact): a mask and its target stay aligned
                m = mask if mask.shape[2:] == t.shape[2:] else F.interpolate(mask.float(), size=t.shape[2:],
                                                                            mode="nearest-exact")
            total = total + w * dice_ce_loss(o, t, batch_dice=self.batch_dice, ignore_index=self.ignore_index, mask=m)
        return total


# ----------------------------------------------------------------------------- regions (sigmoid)
def region_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = False,
                         mask: torch.Tensor | None = None, smooth: float = 1e-5) -> torch.Tensor:
    """nnU-Net's DC_and_BCE_loss for region training: target (B, R, *spatial) in {0, 1}, one
    sigmoid per region, Dice over all regions (do_bg=True) + BCE; ``mask`` (B, 1, *) weights voxels."""
    t = target.float()
    w = torch.ones_like(t[:, :1]) if mask is None else mask.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    bce = (bce * w).sum() / (w.sum() * logits.shape[1]).clamp_min(1.0)
    probs = torch.sigmoid(logits.float())
    axes = tuple(range(2, probs.ndim))
    inter = (probs * t * w).sum(axes)
    pred = (probs * w).sum(axes)
    gt = (t * w).sum(axes)
    if batch_dice:
        inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
    dc = (2 * inter + smooth) / (pred + gt + smooth).clamp_min(1e-8)
    return bce + (1 - dc.mean())


class RegionSupervisedLoss:
    """L_s for region-based datasets (dataset.json regions); targets are the region maps the
    loader makes (deep-supervision lists); with an ignore label the last target channel marks
    ignored voxels."""

    def __init__(self, batch_dice: bool = False, has_ignore: bool = False):
        self.batch_dice = batch_dice
        self.has_ignore = has_ignore

    def _one(self, o: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.has_ignore:
            valid = 1 - t[:, -1:].float()
            t = t[:, :-1]
            mask = valid if mask is None else mask.float() * valid
        return region_dice_bce_loss(o, t, batch_dice=self.batch_dice, mask=mask)

    def __call__(self, output, target, mask: torch.Tensor | None = None) -> torch.Tensor:
        targets: Sequence[torch.Tensor] = target if isinstance(target, (list, tuple)) else [target]
        if not isinstance(output, (list, tuple)):
            return self._one(output, targets[0], mask)
        if len(targets) < len(output):
            raise ValueError(f"{len(output)} deep-supervision outputs but {len(targets)} target scales")
        total = 0.0
        for w, o, t in zip(deep_supervision_weights(len(output)), output, targets):
            if w == 0:
                continue
            m = None
            if mask is not None:
                # the loader's own target downsampling (nearest-exact): a mask and its target stay aligned
                m = mask if mask.shape[2:] == t.shape[2:] else F.interpolate(mask.float(), size=t.shape[2:],
                                                                            mode="nearest-exact")
            total = total + w * self._one(o, t, m)
        return total
