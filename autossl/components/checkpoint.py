"""Checkpoint files: ``checkpoint_{latest,best,final}.pth`` in ``fold_X/`` (atomic writes).

Keys (see documentation/training.md):
``network_weights`` (state of the first inference network), ``networks`` {name: state_dict},
``inference_networks`` [{"name", "arch"}], ``optimizer_states`` {name: state}, ``scheduler_states``
{name: state}, ``grad_scaler_state``, ``rng_states``, ``logging``, ``ssl_state``, ``_best_ema``,
``current_step``, ``total_steps``, ``iterations_per_epoch``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``, ``pseudo_label_cases``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from autossl.utilities.file_io import UnsafeCheckpointError, load_torch_safely, save_torch

REQUIRED_KEYS = (
    "network_weights", "networks", "inference_networks", "optimizer_states", "scheduler_states",
    "grad_scaler_state", "rng_states", "logging", "ssl_state", "_best_ema", "current_step", "total_steps",
    "init_args", "trainer_name", "inference_allowed_mirroring_axes",
)


def save_checkpoint(state: dict, path: str | Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise KeyError(f"checkpoint for {path} lacks {missing}")
    save_torch(state, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = load_torch_safely(path, map_location)
    except UnsafeCheckpointError as e:  # truncated, foreign, or carrying pickled objects (never executed)
        raise RuntimeError(str(e)) from None
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise KeyError(f"{path}: not an autossl training checkpoint (missing {missing})")
    return ckpt


def _numpy_state_to_plain(state: tuple) -> tuple:
    """numpy's MT19937 state with its key as a tensor: checkpoints hold only tensors and plain
    types, so that they load with ``torch.load(weights_only=True)``."""
    name, key, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state) -> tuple:
    name, key, pos, has_gauss, cached = state
    key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (name, key.astype(np.uint32), int(pos), int(has_gauss), float(cached))


def capture_rng_states(extra_generators: dict[str, torch.Generator] | None = None, loader_seeds=None) -> dict:
    states = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items() if g is not None},
        "loader_seeds": loader_seeds,
    }
    return states


def restore_rng_states(states: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(states["python"])
    np.random.set_state(_numpy_state_from_plain(states["numpy"]))
    torch.set_rng_state(states["torch"].cpu() if hasattr(states["torch"], "cpu") else states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    for k, g in (extra_generators or {}).items():
        s = states.get("generators", {}).get(k)
        if g is not None and s is not None:
            g.set_state(s.cpu())
