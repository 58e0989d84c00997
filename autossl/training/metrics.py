"""Online pseudo-Dice on validation patches (nnU-Net's per-epoch estimate)."""
from __future__ import annotations

import torch


def tp_fp_fn(probabilities: torch.Tensor, target: torch.Tensor, *, has_regions: bool = False,
             ignore_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed TP/FP/FN per foreground class (labels: classes 1..C-1 of the argmax; regions: every
    region at p > 0.5). ``target``: (B, 1, *) labels or (B, R[+1 ignore], *) region maps."""
    if has_regions:
        pred = probabilities > 0.5
        t = target.bool()
        valid = torch.ones_like(t[:, :1])
        if ignore_label is not None:
            valid = ~t[:, -1:]
            t = t[:, :-1]
    else:
        c = probabilities.shape[1]
        labels = probabilities.argmax(1, keepdim=True)
        tl = target.long()
        valid = torch.ones_like(tl, dtype=torch.bool)
        if ignore_label is not None:
            valid = tl != ignore_label
            tl = torch.where(valid, tl, torch.zeros_like(tl))
        classes = torch.arange(1, c, device=labels.device).view(1, -1, *([1] * (labels.ndim - 2)))
        pred = labels == classes
        t = tl == classes
    axes = [0] + list(range(2, pred.ndim))
    tp = (pred & t & valid).sum(axes).double()
    fp = (pred & ~t & valid).sum(axes).double()
    fn = (~pred & t & valid).sum(axes).double()
    return tp, fp, fn


def dice_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> list[float]:
    """2TP / (2TP + FP + FN) per class; NaN where a class is absent from prediction and reference."""
    den = 2 * tp + fp + fn
    return [float("nan") if d == 0 else float(2 * a / d) for a, d in zip(tp.tolist(), den.tolist())]
