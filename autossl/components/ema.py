"""Exponential moving average of one or several students' weights into a teacher."""
from __future__ import annotations

import torch
import torch.nn as nn


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(net, "module"):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def warmup_decay(step: int, max_decay: float) -> float:
    """SSL4MIS's and UCMT's α = min(1 - 1/(t+1), max_decay): the teacher follows closely early on."""
    return min(1.0 - 1.0 / (step + 1), max_decay)


def _combine(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out = out + t * w
    return out


@torch.no_grad()
def ema_update(teacher: nn.Module, students: list[nn.Module], decay: float,
               weights: list[float] | None = None) -> None:
    """teacher = decay * teacher + (1 - decay) * sum_i w_i * student_i, parameters and float buffers.

    ``weights`` default to the plain mean (1/n each) and must sum to 1. UCMT's reference code
    weighs its two students 0.99 / 0.01: differently initialised networks do not average into a
    working network, so the teacher is in effect an EMA of student 1 with a trace of student 2."""
    teacher = unwrap(teacher)
    students = [unwrap(s) for s in students]
    if weights is None:
        weights = [1.0 / len(students)] * len(students)
    if len(weights) != len(students) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"ema_update: need one weight per student summing to 1, got {weights}")
    t_params = dict(teacher.named_parameters())
    s_params = [dict(s.named_parameters()) for s in students]
    for name, tp in t_params.items():
        mean = _combine([sp[name].detach().to(tp.dtype) for sp in s_params], weights)
        tp.mul_(decay).add_(mean, alpha=1.0 - decay)
    t_bufs = dict(teacher.named_buffers())
    s_bufs = [dict(s.named_buffers()) for s in students]
    for name, tb in t_bufs.items():
        if tb.dtype.is_floating_point:
            mean = _combine([sb[name].to(tb.dtype) for sb in s_bufs], weights)
            tb.mul_(decay).add_(mean, alpha=1.0 - decay)
        else:
            tb.copy_(s_bufs[0][name])
