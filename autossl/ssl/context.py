"""What the trainer hands a method each step. The trainer builds one ``TrainingContext`` and
updates ``step``; methods read from it and call its helpers, nothing else of the trainer."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


def main_output(output):
    """Highest-resolution output of a network with or without deep supervision."""
    return output[0] if isinstance(output, (list, tuple)) else output


def main_target(target):
    return target[0] if isinstance(target, (list, tuple)) else target


@dataclass
class TrainingContext:
    networks: dict[str, nn.Module]          # trainable ones wrapped in DDP when distributed
    total_steps: int                        # optimiser steps the whole run will take
    num_classes: int                        # segmentation heads
    device: torch.device
    #: L_s: Dice + CE (deep supervision aware): supervised_loss(output, target)
    supervised_loss: Callable[[Any, Any], torch.Tensor]
    #: intensity-only (geometry-preserving) strong augmentation of a batch tensor
    strong_augment: Callable[[torch.Tensor], torch.Tensor]
    #: the autocast context the trainer uses (AMP on CUDA, no-op on the CPU)
    autocast: Callable[[], Any] = nullcontext
    #: self-training: predict the preprocessed unlabelled cases with the real (sliding-window)
    #: predictor using the given networks' softmax average, returns {case: probabilities (C, *spatial)};
    #: keyword ``mirroring`` (default true) as test-time prediction
    predict_unlabeled: Callable[..., dict] | None = None
    #: self-training: hand pseudo-labels {case: seg (1, *spatial), int, -1 = ignore} to the
    #: unlabelled loader; later unlabelled batches then carry "target"
    set_pseudo_labels: Callable[[dict], None] | None = None
    #: names of the preprocessed unlabelled cases (what ``predict_unlabeled`` accepts)
    unlabeled_cases: list[str] = field(default_factory=list)
    step: int = 0                           # optimiser steps done so far in the run
    #: first step of the semi-supervised phase (after the trainer's supervised warm start, 0
    #: without one): ramps and schedules of the unsupervised terms count from here
    ssl_start_step: int = 0
    #: the networks start the semi-supervised phase trained on the labels (``--warmup`` or
    #: ``-pretrained_weights``): automatic ramps are then short
    warm_started: bool = False
    rng: torch.Generator | None = None      # seeded generator for the method's own randomness
    #: classes that the labelled training cases show to be one connected structure (per slice in
    #: 2d): methods may remove their pseudo-labels' other components
    #: (``autossl.ssl.pseudo_label_cleaning``); empty = clean nothing
    single_component_classes: tuple[int, ...] = ()
    #: the foreground classes when the labelled cases show their union to be one structure too
    #: (cleaning then keeps the union's largest component first); empty = no such step
    single_component_foreground: tuple[int, ...] = ()
    #: those classes were decided per slice (a 2d configuration): a whole case's pseudo-label is
    #: then cleaned slice by slice
    single_component_per_slice: bool = False
    _logged: dict[str, list[float]] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    @property
    def ssl_step(self) -> int:
        """Steps done in the semi-supervised phase."""
        return max(0, self.step - self.ssl_start_step)

    @property
    def ssl_total_steps(self) -> int:
        """Length of the semi-supervised phase in steps."""
        return max(1, self.total_steps - self.ssl_start_step)

    def log(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        self._logged.setdefault(name, []).append(float(value))

    def pop_logged(self) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self._logged.items() if v}
        self._logged.clear()
        return out
