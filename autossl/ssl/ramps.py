"""Schedules scaled to the run's total number of steps (never hard-coded iteration counts)."""
from __future__ import annotations

import math


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Laine & Aila: exp(-5 (1 - t/T)^2), 1 after T."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0), rampup_steps) / rampup_steps
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(step: int, rampup_steps: int) -> float:
    if rampup_steps <= 0:
        return 1.0
    return float(min(max(step, 0), rampup_steps) / rampup_steps)
