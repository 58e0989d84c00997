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


@torch.no_grad()
def ema_update(teacher: nn.Module, students: list[nn.Module], decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * mean(students), parameters and float buffers."""
    teacher = unwrap(teacher)
    students = [unwrap(s) for s in students]
    t_params = dict(teacher.named_parameters())
    s_params = [dict(s.named_parameters()) for s in students]
    for name, tp in t_params.items():
        mean = torch.stack([sp[name].detach().to(tp.dtype) for sp in s_params]).mean(0)
        tp.mul_(decay).add_(mean, alpha=1.0 - decay)
    t_bufs = dict(teacher.named_buffers())
    s_bufs = [dict(s.named_buffers()) for s in students]
    for name, tb in t_bufs.items():
        if tb.dtype.is_floating_point:
            mean = torch.stack([sb[name].to(tb.dtype) for sb in s_bufs]).mean(0)
            tb.mul_(decay).add_(mean, alpha=1.0 - decay)
        else:
            tb.copy_(s_bufs[0][name])
