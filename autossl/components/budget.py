"""``--budget 45m``: choose the number of steps so that training, per-epoch validation and the
final validation end within a wall-clock budget.

The trainer measures the step time over a few steps after a warm-up (compilation, worker
start-up) and the time of one validation iteration, then ``plan_steps`` picks whole epochs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_budget(text: str | float | int) -> float:
    """'45m' -> 2700.0; '1.5h', '90s', '2h30m' and plain seconds ('600') are accepted."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            value = float(s)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)(sec|min|hr|s|m|h)", s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ValueError(f"cannot read the budget {text!r}: use e.g. 90s, 45m, 1.5h or 2h30m")
            value = sum(float(n) * _UNITS[u] for n, u in parts)
    if value <= 0:
        raise ValueError(f"the budget must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class BudgetPlan:
    epochs: int
    iterations_per_epoch: int
    total_steps: int
    step_time_s: float
    epoch_overhead_s: float
    final_overhead_s: float
    predicted_total_s: float

    def describe(self) -> str:
        return (f"budget: {self.epochs} epochs x {self.iterations_per_epoch} iterations = {self.total_steps} steps "
                f"(step {self.step_time_s * 1000:.0f} ms, per-epoch validation/checkpoint {self.epoch_overhead_s:.1f} s, "
                f"final validation ~{self.final_overhead_s:.0f} s, predicted end after {self.predicted_total_s / 60:.1f} min)")


def plan_steps(budget_s: float, elapsed_s: float, step_time_s: float, epoch_overhead_s: float,
               final_overhead_s: float, iterations_per_epoch: int, steps_done: int = 0,
               safety: float = 0.05) -> BudgetPlan:
    """The largest number of whole epochs whose remaining steps, epoch ends (validation,
    checkpoint) and final validation fit into ``budget_s`` (minus ``safety`` of it), given the time
    already spent (``elapsed_s``) and the ``steps_done`` so far. The epoch in progress is always
    finished. When not even the first epoch fits, it is shortened."""
    step_time_s = max(step_time_s, 1e-6)
    ipe = int(iterations_per_epoch)
    available = budget_s * (1 - safety) - elapsed_s - final_overhead_s
    epochs_ended = steps_done // ipe                      # epochs whose end (validation) is behind us
    min_epochs = max(1, -(-steps_done // ipe))            # finish the epoch in progress
    per_epoch = ipe * step_time_s + epoch_overhead_s
    epochs = int(math.floor((available + steps_done * step_time_s + epochs_ended * epoch_overhead_s) / per_epoch))
    if epochs >= min_epochs:
        iters = ipe
    elif epochs_ended == 0:  # the first epoch does not fit: a shorter one
        epochs = 1
        iters = max(1, steps_done, steps_done + int(math.floor(max(0.0, available - epoch_overhead_s) / step_time_s)))
        iters = min(iters, ipe)
    else:
        epochs, iters = min_epochs, ipe
    total = epochs * iters
    remaining = (total - steps_done) * step_time_s + (epochs - epochs_ended) * epoch_overhead_s
    return BudgetPlan(epochs, iters, total, step_time_s, epoch_overhead_s, final_overhead_s,
                      elapsed_s + remaining + final_overhead_s)
