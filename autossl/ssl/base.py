"""The semi-supervised plug-in interface.

A method is one class in one file under ``autossl/ssl/methods/``, registered by name with
``@register("name")``. The trainer owns the loop, optimisers, schedules, AMP, DDP, checkpoints
and logging; a method only says

* which networks it needs (``network_specs``): built from the plans by the trainer,
* how to turn a labelled and an unlabelled batch into loss(es) (``training_step``; a generator
  that ``yield``s one loss per optimiser step, so a method with two steps per iteration, like
  UCMT's UMIX step, yields twice and sees the updated weights in its second step),
* what happens after each optimiser step (``after_optimizer_step``: EMA teachers),
* which network(s) predict at test time (``inference_networks``),
* the scalars it logs (``scalars``) and any extra state for the checkpoint.

The trainer never branches on which method runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover
    from autossl.ssl.context import TrainingContext


@dataclass(frozen=True)
class NetworkSpec:
    """A network a method needs.

    name:      key in ``ctx.networks`` (e.g. "student", "teacher", "cnn2", "transformer").
    arch:      "cnn" (the plans' ``architecture``), "transformer" (``transformer_architecture``) or
               "hybrid" (``hybrid_architecture``: the planned CNN and transformer in one network,
               Semiformer's); ``autossl.networks.build.ARCHITECTURE_KEYS``.
    trainable: gets an optimiser (SGD+poly for cnn, AdamW+warm-up for transformer) and is wrapped
               in DDP; non-trainable networks (EMA teachers) get neither and stay in eval mode
               unless the method says otherwise.
    copy_of:   initialise with the weights of another spec (an EMA teacher starts as its student).
    seed_offset: a different initialisation for a second network of the same architecture.
    dropout:   SSL4MIS's encoder dropout for a cnn, this rate at the bottleneck
               (``networks.build.add_dropout``; the planned U-Nets have none): for methods whose
               perturbation is dropout. Inactive in eval mode; prediction builds the plain network.
    """

    name: str
    arch: str = "cnn"
    trainable: bool = True
    copy_of: str | None = None
    seed_offset: int = 0
    dropout: float = 0.0


class SSLMethod(ABC):
    name: ClassVar[str] = ""
    #: whether the trainer must feed unlabelled batches
    uses_unlabeled: ClassVar[bool] = True
    #: unlabelled patches per labelled patch in a batch (papers' default)
    default_unlabeled_ratio: ClassVar[float] = 1.0
    #: names of the scalars this method logs each step (averaged per epoch, drawn in progress.png)
    scalars: ClassVar[tuple[str, ...]] = ()
    #: offline rounds (self-training): the trainer splits the run into this many rounds and calls
    #: ``on_round_end`` between them
    rounds: ClassVar[int] = 1
    #: restart the learning-rate schedule (warm-up and poly decay) at every round, so that each
    #: round ends annealed (self-training predicts its pseudo-labels with that model)
    restart_lr_each_round: ClassVar[bool] = False
    #: supervised warm start before the semi-supervised phase when ``autossl_train --warmup`` is
    #: not given: a share of the run (< 1) or iterations (>= 1); 0 = none. During it every
    #: trainable network is trained on the labelled batches alone and no unlabelled batch is
    #: drawn; then copies (``copy_of``: EMA teachers) take their sources' weights, the learning
    #: rate restarts, and ``ctx.ssl_step`` / ``ctx.ssl_total_steps`` count the phase that follows.
    #: Half the run by default: from random weights the unsupervised terms teach noise (measured
    #: on A2D-3 and H3D, documentation/benchmarks.md)
    default_warmup: ClassVar[float] = 0.5
    #: printed at the start of a run without ``-pretrained_weights``: the pre-training this
    #: method's networks are measured to need (empty: the trainer's default for the run's
    #: networks, ``training.warm_start.default_pretrain_hint``)
    pretrain_hint: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self.options = options

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """How many losses ``training_step`` yields (optimiser steps per iteration): benchmarks
        that give every method the same number of optimiser steps divide by it."""
        return 1

    def option(self, key: str, default):
        """Read ``--ssl-opt key=value`` with the type of ``default``."""
        if key not in self.options:
            return default
        v = self.options[key]
        if isinstance(default, bool) and isinstance(v, str):
            return v.lower() in ("1", "true", "yes", "on")
        return type(default)(v) if default is not None else v

    def relative_cost(self, unlabeled_ratio: float) -> float:
        """Arithmetic cost of one iteration against supervised training's, in patch passes: a
        forward pass over a patch counts 1, forward and backward 3; supervised training makes
        3·B for a batch of B labelled patches; ``unlabeled_ratio`` r adds r·B unlabelled patches.
        Benchmarks print it beside the measured time per iteration."""
        return 1.0

    # ----------------------------------------------------------------- networks
    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student")]

    def inference_networks(self) -> list[str]:
        """Networks whose softmax outputs are averaged at test time."""
        return [self.network_specs()[0].name]

    def setup(self, ctx: "TrainingContext") -> None:
        """Called once after the networks are built (and after a checkpoint is loaded)."""

    # ----------------------------------------------------------------- training
    @abstractmethod
    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: "TrainingContext") -> Iterator[torch.Tensor]:
        """Yield one scalar loss per optimiser step.

        labeled:   {"data": (B, C, *patch), "target": list of (B, 1, *) per deep-supervision scale
                    (highest resolution first), "keys": [...]}
        unlabeled: {"data": (Bu, C, *patch), "keys": [...]} (+ "target" where pseudo-labels exist),
                   or None when ``uses_unlabeled`` is False.
        """

    def after_optimizer_step(self, ctx: "TrainingContext") -> None:
        """EMA updates and the like; called after every optimiser step."""

    def on_round_end(self, round_index: int, ctx: "TrainingContext") -> None:
        """Between offline rounds (``rounds`` > 1)."""

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
