"""Optimisers and step-based learning-rate schedules.

* cnn networks: SGD, lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, poly schedule
  lr = lr0 · (1 - step/total)^0.9 (nnU-Net v2's defaults; nnU-Net steps per epoch, we step per
  iteration because the number of steps is what budgets and ramps are defined on).
* transformer networks: AdamW, lr 3e-4, weight decay 5e-2, betas (0.9, 0.98) (nnU-Net's Primus
  trainers), linear warm-up over the first ``TRANSFORMER_WARMUP_FRACTION`` (5 %) of the steps,
  then poly decay over the rest.
* hybrid networks (a CNN and a transformer joined, ``--ssl semiformer``): the transformer's
  settings for the whole network.

A configuration of the plans may replace these per network kind with an ``"optimizer"`` entry,
``{"cnn": {"kind": "adamw", "lr": 1e-3, "weight_decay": 1e-4}}`` (plans as data: the CPU plans
use it for 2D, see documentation/planning.md). Keys left out keep the defaults above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

TRANSFORMER_WARMUP_FRACTION = 0.05


@dataclass
class OptimizerConfig:
    kind: str            # "sgd" | "adamw"
    lr: float
    weight_decay: float
    warmup_fraction: float = 0.0


CONFIGS = {
    "cnn": OptimizerConfig("sgd", 1e-2, 3e-5, 0.0),
    "transformer": OptimizerConfig("adamw", 3e-4, 5e-2, TRANSFORMER_WARMUP_FRACTION),
    # a CNN and a transformer in one network (Semiformer): the transformer's AdamW and warm-up,
    # which Semiformer (DeiT's recipe) trains both branches with
    "hybrid": OptimizerConfig("adamw", 3e-4, 5e-2, TRANSFORMER_WARMUP_FRACTION),
}
KINDS = ("sgd", "adamw")


def optimizer_configs(entry: dict | None, where: str = "plans") -> dict[str, OptimizerConfig]:
    """The defaults, updated by a configuration's ``"optimizer"`` entry (validated: a wrong kind,
    key or value is an error that says where it is, not a silent default)."""
    configs = dict(CONFIGS)
    if entry is None:
        return configs
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: 'optimizer' must be a mapping of network kind to settings, got {entry!r}")
    for arch, settings in entry.items():
        if arch not in CONFIGS:
            raise ValueError(f"{where}: 'optimizer' names unknown network kind {arch!r}; expected {sorted(CONFIGS)}")
        unknown = set(settings) - {"kind", "lr", "weight_decay", "warmup_fraction"}
        if unknown:
            raise ValueError(f"{where}: 'optimizer.{arch}' has unknown keys {sorted(unknown)}")
        base = CONFIGS[arch]
        cfg = OptimizerConfig(str(settings.get("kind", base.kind)), float(settings.get("lr", base.lr)),
                              float(settings.get("weight_decay", base.weight_decay)),
                              float(settings.get("warmup_fraction", base.warmup_fraction)))
        if cfg.kind not in KINDS or not cfg.lr > 0 or cfg.weight_decay < 0 or not 0 <= cfg.warmup_fraction < 1:
            raise ValueError(f"{where}: 'optimizer.{arch}' = {settings!r} is invalid (kind in {KINDS}, lr > 0, "
                             f"weight_decay >= 0, 0 <= warmup_fraction < 1)")
        configs[arch] = cfg
    return configs


def build_optimizer(network: nn.Module, arch: str,
                    configs: dict[str, OptimizerConfig] | None = None) -> torch.optim.Optimizer:
    configs = CONFIGS if configs is None else configs
    if arch not in configs:
        raise ValueError(f"unknown network arch {arch!r}; expected one of {sorted(configs)}")
    cfg = configs[arch]
    params = [p for p in network.parameters() if p.requires_grad]
    if cfg.kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.99, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def round_boundaries(total_steps: int, rounds: int) -> list[int]:
    """Steps at which rounds 2..n of an ``rounds``-round run start (offline methods)."""
    return [int(round(total_steps * (r + 1) / rounds)) for r in range(max(1, rounds) - 1)]


class PolyWarmupSchedule:
    """lr(step): linear warm-up from lr0/warmup to lr0 over ``warmup`` steps, then
    lr0 · (1 - (step - warmup) / (total - warmup))^exponent. ``step(s)`` sets the lr for step s.

    ``cycles`` > 1 restarts the schedule at ``round_boundaries(total, cycles)``: each round of an
    offline method (self-training) is then a whole training with its own warm-up and decay.
    ``restarts`` adds restarts at given steps: the end of the trainer's supervised warm start, so
    that the warm start ends annealed and the semi-supervised phase has a schedule of its own, as
    when it starts from another run's weights."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, total_steps: int,
                 warmup_fraction: float = 0.0, exponent: float = 0.9, cycles: int = 1,
                 restarts: list[int] | tuple[int, ...] = ()):
        self.optimizer = optimizer
        self.restarts = sorted({int(r) for r in restarts})
        self.initial_lr = float(initial_lr)
        self.warmup_fraction = float(warmup_fraction)
        self.exponent = float(exponent)
        self.cycles = max(1, int(cycles))
        self.total_steps = max(1, int(total_steps))
        self.last_step = 0
        self.step(0)

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))
        self.step(self.last_step)

    def set_restarts(self, restarts) -> None:
        self.restarts = sorted({int(r) for r in restarts})
        self.step(self.last_step)

    def _cycle(self, step: int) -> tuple[int, int]:
        inner = {*round_boundaries(self.total_steps, self.cycles), *self.restarts}
        bounds = [0, *sorted(b for b in inner if 0 < b < self.total_steps), self.total_steps]
        for start, end in zip(bounds[:-1], bounds[1:]):
            if step < end:
                return start, end
        return bounds[-2], bounds[-1]

    def lr_at(self, step: int) -> float:
        start, end = self._cycle(step)
        step, length = step - start, max(1, end - start)
        w = int(round(self.warmup_fraction * length))
        if w > 0 and step < w:
            return self.initial_lr * (step + 1) / w
        span = max(1, length - w)
        frac = min(1.0, max(0.0, (step - w) / span))
        return self.initial_lr * (1.0 - frac) ** self.exponent

    def step(self, step: int) -> float:
        self.last_step = int(step)
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def get_last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"initial_lr": self.initial_lr, "total_steps": self.total_steps, "warmup_fraction": self.warmup_fraction,
                "exponent": self.exponent, "last_step": self.last_step, "cycles": self.cycles,
                "restarts": list(self.restarts)}

    def load_state_dict(self, state: dict) -> None:
        self.initial_lr = float(state["initial_lr"])
        self.total_steps = int(state["total_steps"])
        self.warmup_fraction = float(state["warmup_fraction"])
        self.exponent = float(state["exponent"])
        self.cycles = int(state.get("cycles", 1))
        self.restarts = sorted(int(r) for r in state.get("restarts", ()))
        self.step(int(state["last_step"]))


def build_schedule(optimizer: torch.optim.Optimizer, arch: str, total_steps: int,
                   cycles: int = 1, configs: dict[str, OptimizerConfig] | None = None) -> PolyWarmupSchedule:
    cfg = (CONFIGS if configs is None else configs)[arch]
    return PolyWarmupSchedule(optimizer, cfg.lr, total_steps, cfg.warmup_fraction, cycles=cycles)


def clip_gradients(network: nn.Module, max_norm: float = 12.0) -> None:
    params = [p for p in network.parameters() if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
