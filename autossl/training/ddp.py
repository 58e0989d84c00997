"""Distributed data parallel helpers (``torchrun``): NCCL on GPUs, gloo on the CPU.

``torchrun --nproc_per_node=2 -m autossl.cli.train ...`` (or the ``autossl_train`` script) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``init_distributed`` joins the group. The global batch
size of the plans is split over the ranks as nnU-Net does, including the share of
foreground-oversampled patches each rank draws.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def split_batch(global_batch_size: int, oversample: float, world_size: int, rank: int) -> tuple[int, float]:
    """nnU-Net's per-rank batch size and foreground-oversampling share."""
    if world_size <= 1:
        return global_batch_size, oversample
    if global_batch_size < world_size:
        raise ValueError(f"the batch size ({global_batch_size}) is smaller than the number of processes ({world_size})")
    per = int(np.ceil(global_batch_size / world_size))
    sizes, shares = [], []
    for r in range(world_size):
        bs = per - ((r + 1) * per - global_batch_size) if (r + 1) * per > global_batch_size else per
        sizes.append(bs)
        low = int(np.sum(sizes[:-1]))
        high = int(np.sum(sizes))
        if high / global_batch_size < (1 - oversample):
            shares.append(0.0)
        elif low / global_batch_size > (1 - oversample):
            shares.append(1.0)
        else:
            covered = high / global_batch_size - low / global_batch_size
            shares.append(1 - (((1 - oversample) - low / global_batch_size) / covered))
    return sizes[rank], shares[rank]


def all_gather_objects(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
