"""What every training stage resolves before it starts: the device (``-device``) and the plans'
configuration (``inherits_from`` resolved), with a ``TrainingError`` that says what to do."""
from __future__ import annotations

import torch

from autossl.components.errors import TrainingError
from autossl.planning.plans_handler import PlansManager


def resolve_configuration(plans: dict, name: str) -> dict:
    """The configuration dict with ``inherits_from`` resolved (``PlansManager``)."""
    try:
        return PlansManager(plans).get_configuration(name).configuration
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainingError(f"plans {plans.get('plans_name', '')!r}: {e}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"-device must be cpu, cuda or mps, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("-device cuda was requested but torch sees no CUDA device; use -device cpu")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TrainingError("-device mps was requested but MPS is not available; use -device cpu")
    return torch.device(device)
