"""``--budget`` for the trainer: measure a forward pass, estimate validation and prediction time,
then fix the run's length with ``autossl.components.budget.plan_steps``."""
from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch

from autossl.components.budget import BudgetPlan, plan_steps
from autossl.preprocessing import storage
from autossl.training import ddp


def estimate_forward_time(trainer) -> float:
    """Seconds per validation batch forward pass with the inference networks."""
    nets = trainer._inference_modules()
    x = torch.zeros((trainer.batch_size, trainer.num_input_channels, *trainer.patch_size), device=trainer.device)
    with trainer._eval_mode(nets), torch.no_grad(), trainer._autocast():
        for net in nets:
            net(x)  # warm-up
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for _ in range(2):
            for net in nets:
                net(x)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.time() - t) / 2


def sliding_window_tiles(patch, shape) -> int:
    """Tiles of the sliding window (step 0.5 of the patch) over a case of ``shape`` (2D patches
    over a 3D case: per slice)."""
    shape = tuple(int(s) for s in shape)
    if len(patch) == len(shape) - 1:
        n_slices, shape = shape[0], shape[1:]
    else:
        n_slices = 1
    n = 1
    for s, p in zip(shape, patch):
        n *= 1 if s <= p else int(math.ceil((s - p) / (p * 0.5))) + 1
    return n * n_slices


def prediction_time(trainer, folder: Path, cases: list[str], t_patch: float) -> float:
    """Estimated seconds to predict ``cases`` with mirroring, from the seconds per patch."""
    total = 0.0
    flips = 2 ** len(trainer.geometry.mirror_axes)
    for case in cases:
        data, _, _ = storage.load_case(folder, case, load_seg=False)
        total += sliding_window_tiles(trainer.patch_size, data.shape[1:]) * flips * t_patch + 2.0
    return total


def apply_budget(trainer, step_time: float) -> None:
    """Fix ``trainer``'s length from the measured step time (``--budget``)."""
    t_fwd = estimate_forward_time(trainer)
    t_patch = t_fwd / max(1, trainer.batch_size)
    t0 = time.time()
    torch.save(trainer._checkpoint_state(), io.BytesIO())
    t_ckpt = (time.time() - t0) / trainer.save_every
    epoch_overhead = (trainer.val_iterations * t_fwd * 1.3 if "val" in trainer._streams else 0.0) + t_ckpt + 1.0
    final = 0.0
    if trainer.fold != "all":
        final += prediction_time(trainer, trainer.data_folder, trainer.val_keys, t_patch) / trainer.dist.world_size
    if trainer.rounds > 1:
        final += (trainer.rounds - 1) * prediction_time(trainer, trainer.unlabeled_data_folder, trainer.unlabeled_keys,
                                                           t_patch) / trainer.dist.world_size
    plan = plan_steps(trainer.budget_s, time.time() - trainer._t_start, step_time, epoch_overhead, final,
                      trainer.iterations_per_epoch, steps_done=trainer.current_step)
    if trainer.max_epochs is not None and plan.epochs > trainer.max_epochs:
        total = trainer.max_epochs * trainer.iterations_per_epoch
        plan = BudgetPlan(trainer.max_epochs, trainer.iterations_per_epoch, total, step_time, epoch_overhead, final,
                          time.time() - trainer._t_start + (total - trainer.current_step) * step_time
                          + (trainer.max_epochs - trainer.current_step // trainer.iterations_per_epoch) * epoch_overhead
                          + final)
    plan = ddp.broadcast_object(plan)
    trainer._budget_plan = plan
    trainer._budget_decided = True
    trainer.iterations_per_epoch = plan.iterations_per_epoch
    trainer.num_epochs = plan.epochs
    trainer.total_steps = max(plan.total_steps, trainer.current_step)
    trainer.ctx.total_steps = trainer.total_steps
    for s in trainer.schedulers.values():
        s.set_total_steps(trainer.total_steps)
    trainer._sync_phases()
    trainer.logger.print(plan.describe())
