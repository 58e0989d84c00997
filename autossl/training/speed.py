"""Mixed precision for training where the hardware computes it natively (the other CPU speed-up,
InstanceNorm run as GroupNorm, is shared with inference: ``autossl.networks.norms``).

``training_autocast_dtype``: float16 on CUDA (nnU-Net's AMP, with a GradScaler) and bfloat16 on
CPUs with AMX / AVX512-BF16 (about 2x faster 3D convolutions there; no GradScaler needed for
bf16). Weights, optimiser state and the losses stay float32. ``autossl_cpu_amp=0`` (or
``amp=False``) keeps the CPU in float32, as do CPUs without native bf16 (emulated bf16 is slower
than float32).
"""
from __future__ import annotations

import torch

from autossl.inference.sliding_window import autocast_dtype


def training_autocast_dtype(device: torch.device | str, amp: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for training on ``device`` (None: float32 throughout).

    ``amp`` None: automatic (float16 on CUDA; bfloat16 on CPUs with native bf16 unless
    ``autossl_cpu_amp=0``; nothing on MPS), False: off, True: on (bf16 on any CPU)."""
    device = torch.device(device)
    if amp is False or device.type not in ("cuda", "cpu"):
        return None
    return autocast_dtype(device, amp)
