"""The one trainer: every semi-supervised method runs through this loop.

The trainer owns data loading, networks, optimisers, schedules, AMP, DDP, checkpoints, logging,
validation and the time budget; a method (``autossl/ssl/methods``) only turns batches into
losses through the interface in ``autossl/ssl/base.py``. The trainer never branches on the method.

    trainer = Trainer(4, "3d_fullres", 0, ssl="mean_teacher")
    trainer.run()                      # train, checkpoint_final, validate the held-out fold
    Trainer(4, "3d_fullres", 0).run(continue_training=True)   # --c
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from autossl import paths
from autossl.components.augmentation.pipelines import (augmentation_geometry, training_transforms,
                                                       validation_transforms, weak_transforms)
from autossl.components.budget import BudgetPlan, parse_budget
from autossl.components.checkpoint import capture_rng_states, load_checkpoint, restore_rng_states, save_checkpoint
from autossl.components.dataloading.augmenter import BatchStream, default_num_workers
from autossl.components.dataloading.dataset import PreprocessedCases
from autossl.components.dataloading.loaders import LabeledDataLoader, UnlabeledDataLoader
from autossl.components.dataloading.splits import split_for_fold
from autossl.components.ema import unwrap
from autossl.components.errors import TrainingError, TrainingInterrupted
from autossl.components.logger import TrainingLogger
from autossl.components.losses import RegionSupervisedLoss, SupervisedLoss
from autossl.components.resolve import resolve_configuration, resolve_device
from autossl.inference.predictor import Predictor
from autossl.networks.build import (ARCHITECTURE_KEYS, ArchitectureError, add_dropout, architecture_entry,
                                    build_network, has_deep_supervision, set_deep_supervision)
from autossl.networks.norms import instance_norm_as_group_norm
from autossl.preprocessing import storage
from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.registry import create_method
from autossl.training import ddp, final_validation, pseudo_labels, warm_start
from autossl.training.budget_fit import apply_budget
from autossl.training.naming import trainer_name
from autossl.training.metrics import dice_from_counts, tp_fp_fn
from autossl.training.optim import (build_optimizer, build_schedule, clip_gradients, has_gradients, optimizer_configs,
                                    round_boundaries)
from autossl.training.speed import training_autocast_dtype
from autossl.utilities.dataset_name import find_dataset_name
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.label_handling import LabelManager

DEFAULT_PLANS = "autosslPlans"
GRAD_CLIP = 12.0
OVERSAMPLE_FOREGROUND = 0.33
#: budget: steps run before timing starts (compilation, worker start-up) and steps timed
BUDGET_WARMUP_STEPS = 3
BUDGET_MEASURE_STEPS = 10
_STREAM_IDS = {"train": 1, "val": 2, "unlabeled": 3}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "t", "yes", "on")


def _to_device(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None:
        return None
    nb = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=nb)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=nb) for t in v]
        else:
            out[k] = v
    return out


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Train one fold of one configuration with one semi-supervised method.

    dataset:        ID or DatasetXXX_Name (preprocessed with ``autossl_plan_and_preprocess``)
    configuration:  "2d", "3d_fullres", ... (a configuration of the plans)
    fold:           0-4 (``splits_final.json``) or "all"
    plans:          plans identifier (default ``autosslPlans``)
    ssl:            method name (``autossl.ssl.registry``; "none" = supervised)
    ssl_options:    ``--ssl-opt key=value`` pairs handed to the method
    network:        "cnn" or "transformer": the main architecture (handed to the method as the
                    option ``network``; adds ``_transformer`` to the trainer name)
    epochs, iterations_per_epoch, val_iterations: the run's length (total steps = epochs x iterations;
                    epochs default 1000)
    budget:         "45m" etc.: choose the number of epochs so the run ends within it (``epochs``,
                    when given, is then an upper bound)
    unlabeled_ratio: unlabelled patches per labelled patch (default: the method's)
    num_workers:    data-augmentation processes (default ``autossl_n_proc_DA`` or min(cpus, 4))
    compile:        torch.compile the trainable networks (CUDA only; default env ``autossl_compile``)
    amp:            mixed precision; None = automatic (float16 on CUDA, bfloat16 on CPUs with native
                    bf16 unless env ``autossl_cpu_amp=0``), False = float32 (``autossl.training.speed``)
    save_every:     write checkpoint_latest every N epochs
    npz:            final validation also saves probabilities (.npz)
    warmup:         supervised warm start inside the run: the first iterations train every trainable
                    network on the labelled batches alone (no unlabelled batch is drawn), the
                    learning-rate schedule restarts at its end and the method's copies (EMA
                    teachers) start from their trained sources. A value < 1 is a share of the
                    run, >= 1 a number of iterations; None = the method's ``default_warmup`` (0 when
                    ``pretrained_weights`` starts the run warm).
    pretrained_weights: a checkpoint (or a results folder holding one) whose network weights
                    initialise every network of the same architecture (nnU-Net's
                    ``-pretrained_weights``); a warm start from another run. A list of
                    self-supervised pre-trainings loads each into the networks of its kind (a
                    U-Net's and a transformer's for cross teaching); two that load the same
                    network are an error
    snapshot_every: also keep ``checkpoint_step<N>.pth`` every N epochs (diagnostics over a run)
    """

    def __init__(self, dataset: str | int, configuration: str, fold: int | str, *, plans: str = DEFAULT_PLANS,
                 ssl: str = "none", ssl_options: dict[str, Any] | None = None, network: str = "cnn",
                 device: str | torch.device | None = None, epochs: int | None = None, iterations_per_epoch: int = 250,
                 val_iterations: int = 50, budget: str | float | None = None, seed: int = 12345,
                 unlabeled_ratio: float | None = None, num_workers: int | None = None, compile: bool | None = None,
                 save_every: int = 1, npz: bool = False, verbose: bool = True, amp: bool | None = None,
                 warmup: float | None = None, pretrained_weights: str | os.PathLike | None = None,
                 snapshot_every: int = 0):
        if network not in ("cnn", "transformer"):
            raise TrainingError(f"--network must be cnn or transformer, got {network!r}")
        if str(fold) != "all":
            try:
                fold = int(fold)
            except ValueError:
                raise TrainingError(f"fold must be 0-4 (or another split index) or 'all', got {fold!r}") from None
        self.max_epochs = None if epochs is None else int(epochs)  # with a budget: an upper bound
        epochs = 1000 if epochs is None else int(epochs)
        if epochs < 1 or iterations_per_epoch < 1 or val_iterations < 0 or save_every < 1:
            raise TrainingError("epochs, iterations per epoch and --save-every must be >= 1, val iterations >= 0")
        self.configuration = configuration
        self.fold = fold
        self.plans_identifier = plans
        self.ssl = ssl or "none"
        self.network_choice = network
        self.ssl_options = dict(ssl_options or {})
        if network != "cnn":
            self.ssl_options.setdefault("network", network)
        self.num_epochs = int(epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.val_iterations = int(val_iterations)
        self.budget_s = parse_budget(budget) if budget not in (None, "", 0) else None
        self.seed = int(seed)
        self.save_every = int(save_every)
        self.npz = npz
        self.verbose = verbose

        self.device = resolve_device(device)
        self.dist = ddp.init_distributed(self.device.type)
        if self.dist.is_ddp and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.compile = (_env_flag("autossl_compile") if compile is None else bool(compile)) and self.device.type == "cuda"
        self.amp_dtype = training_autocast_dtype(self.device, amp)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise TrainingError(f"--num-workers must be >= 0, got {self.num_workers}")

        # ---------------------------------------------------------------- dataset, plans
        try:
            self.dataset_name = find_dataset_name(dataset)
        except FileNotFoundError as e:
            raise TrainingError(f"{e}; convert the dataset to the raw format and run "
                                f"autossl_plan_and_preprocess -d {dataset}") from None
        self.preprocessed_base = paths.preprocessed_dir() / self.dataset_name
        plans_file = self.preprocessed_base / f"{plans}.json"
        if not plans_file.is_file():
            raise TrainingError(f"{plans_file} does not exist: the dataset is not planned/preprocessed with plans "
                                f"{plans!r}; run autossl_plan_and_preprocess -d {dataset} -c {configuration}")
        self.plans = load_json(plans_file)
        dj_file = self.preprocessed_base / "dataset.json"
        if not dj_file.is_file():
            raise TrainingError(f"{dj_file} is missing; rerun autossl_plan_and_preprocess -d {dataset}")
        self.dataset_json = load_json(dj_file)
        self.cfg = resolve_configuration(self.plans, configuration)
        for key in ("data_identifier", "patch_size", "batch_size"):
            if key not in self.cfg:
                raise TrainingError(f"{plans_file}: configuration {configuration!r} has no {key!r}")
        try:
            self.optimizer_configs = optimizer_configs(self.cfg.get("optimizer"),
                                                       f"{plans_file}: configuration {configuration!r}")
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.data_folder = self.preprocessed_base / self.cfg["data_identifier"]
        if not storage.list_cases(self.data_folder):
            raise TrainingError(f"{self.data_folder} holds no preprocessed cases; run autossl_plan_and_preprocess "
                                f"-d {dataset} -c {configuration} (or autossl_preprocess for plans {plans!r})")
        self.unlabeled_data_folder = storage.unlabeled_folder(self.data_folder)

        # ---------------------------------------------------------------- method
        try:
            self.method: SSLMethod = create_method(self.ssl, **self.ssl_options)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.specs: list[NetworkSpec] = self._check_specs(self.method.network_specs())
        self.rounds = max(1, int(getattr(self.method, "rounds", 1)))
        self.uses_unlabeled = bool(self.method.uses_unlabeled)
        ratio = self.method.default_unlabeled_ratio if unlabeled_ratio is None else float(unlabeled_ratio)
        if ratio < 0:
            raise TrainingError(f"--unlabeled-ratio must be >= 0, got {ratio}")
        self.unlabeled_ratio = float(ratio)
        self.trainer_name = trainer_name(self.ssl, network)
        # a run started from another run's weights is warm already: no supervised phase unless asked;
        # a self-supervised pre-training holds an encoder only, so the method's warm start still runs
        self._encoder_only_start = False
        sources = [] if not pretrained_weights else \
            [pretrained_weights] if isinstance(pretrained_weights, (str, os.PathLike)) else list(pretrained_weights)
        if sources:
            from autossl.training.warm_start import is_encoder_only_source
            only = [is_encoder_only_source(s, fold) for s in sources]
            if len(sources) > 1 and not all(only):
                raise TrainingError("-pretrained_weights with several sources takes self-supervised pre-trainings "
                                    "(autossl_pretrain) only, e.g. one for the U-Nets and one for the transformer; "
                                    "a trained segmentation run starts every network on its own")
            self._encoder_only_start = all(only)
        default = self.method.default_warmup if (not sources or self._encoder_only_start) else 0.0
        self.warmup = float(default if warmup is None else warmup)
        if math.isnan(self.warmup) or self.warmup < 0:
            raise TrainingError(f"--warmup must be >= 0 (a share of the run below 1, iterations from 1), got {warmup}")
        #: every -pretrained_weights source; ``pretrained_weights`` is the first (None: none)
        self.pretrained_sources = [Path(p) for p in sources]
        self.pretrained_weights = self.pretrained_sources[0] if sources else None
        self.snapshot_every = int(snapshot_every)
        self._warmup_done = False
        self._single_components: tuple | None = None  # (classes, foreground), decided from the labelled cases
        self._pretrained_loaded = False
        #: the method's predictions of the unlabelled pool during training (``predict_unlabeled``):
        #: how many, patches through a network (tiles x flips x networks) and seconds; part of the
        #: run's work that its training steps do not show (debug.json, the benchmark's ratios)
        self.pool_prediction = {"predictions": 0, "network_inputs": 0, "seconds": 0.0}
        self._dropout_hooks: list = []  # a method's dropout: off during the supervised warm start

        # ---------------------------------------------------------------- labels, patches, batches
        self.label_manager = LabelManager.from_dataset_json(self.dataset_json)
        self.num_heads = self.label_manager.num_segmentation_heads
        channels = self.dataset_json.get("channel_names", self.dataset_json.get("modality"))
        if not channels:
            raise TrainingError(f"{dj_file}: no channel_names")
        self.num_input_channels = len(channels)
        self.patch_size = tuple(int(p) for p in self.cfg["patch_size"])
        self.geometry = augmentation_geometry(self.patch_size)
        self.deep_supervision_scales = self._deep_supervision_scales()
        self.batch_size, self.oversample = ddp.split_batch(int(self.cfg["batch_size"]), OVERSAMPLE_FOREGROUND,
                                                           self.dist.world_size, self.dist.rank)
        self.unlabeled_batch_size = max(1, int(round(self.unlabeled_ratio * self.batch_size))) \
            if self.uses_unlabeled and self.unlabeled_ratio > 0 else 0

        # ---------------------------------------------------------------- output
        self.output_folder_base = paths.results_dir() / self.dataset_name / \
            f"{self.trainer_name}__{plans}__{configuration}"
        self.output_folder = self.output_folder_base / f"fold_{fold}"
        if self.dist.is_main:
            self.output_folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
        self.logger = TrainingLogger(self.output_folder / f"training_log_{stamp}.txt", enabled=self.dist.is_main,
                                     echo=verbose)

        # ---------------------------------------------------------------- filled by initialize()
        self.networks: dict[str, nn.Module] = {}       # plain modules
        self.wrapped: dict[str, nn.Module] = {}        # what methods see (DDP / compiled)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict = {}
        self.grad_scaler = None
        self.ctx: TrainingContext | None = None
        self.total_steps = self.num_epochs * self.iterations_per_epoch
        self.current_step = 0
        self._best_ema: float | None = None
        self._budget_plan: BudgetPlan | None = None
        self._budget_decided = self.budget_s is None
        self._loader_seeds: dict[str, list[int]] = {}
        self._streams: dict[str, BatchStream] = {}
        self._loaders: dict = {}
        self._pseudo_label_sets = 0
        self._rng: torch.Generator | None = None
        self._strong = None
        self._initialized = False
        self._t_start = time.time()
        self._last_plot = (0.0, 0.0)  # (when, how long it took)
        self._stop_signal: int | None = None  # SIGTERM/SIGINT received during train()
        self.tr_keys: list[str] = []
        self.val_keys: list[str] = []
        self.unlabeled_keys: list[str] = []

    # ================================================================== phases
    @property
    def warmup_steps(self) -> int:
        """Iterations of the supervised warm start (0: none)."""
        if self.warmup <= 0:
            return 0
        n = int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.total_steps))
        return min(n, self.total_steps)

    def _sync_phases(self) -> None:
        """Tell the schedules and the method context where the semi-supervised phase starts
        (after the run's length is known or changed)."""
        w = self.warmup_steps
        for hook in self._dropout_hooks:  # the warm start trains the plain planned network
            hook.active = self.current_step >= w
        for s in self.schedulers.values():
            s.set_restarts([w] if 0 < w < self.total_steps else [])
        if self.ctx is not None:
            self.ctx.ssl_start_step = w
            self.ctx.total_steps = self.total_steps
            self.ctx.warm_started = w > 0 or (self._pretrained_loaded and not self._encoder_only_start)

    def _in_warmup(self) -> bool:
        return self.current_step < self.warmup_steps

    def _copy_sources(self) -> None:
        """Copies (EMA teachers) take their sources' current weights."""
        for spec in self.specs:
            if spec.copy_of is not None:
                unwrap(self.networks[spec.name]).load_state_dict(unwrap(self.networks[spec.copy_of]).state_dict())

    def _end_warmup(self) -> None:
        """Copies (EMA teachers) take their sources' warm weights; unlabelled batches start."""
        self._copy_sources()
        self._warmup_done = True
        self._sync_phases()
        self._start_unlabeled_stream()
        self.logger.print(f"supervised warm start done at step {self.current_step}: "
                          f"{self.ssl} trains on unlabelled batches from here")

    def _warmup_step(self, labeled: dict):
        """One supervised step for every trainable network (the warm start's loss)."""
        loss = None
        for spec in self.specs:
            if not spec.trainable:
                continue
            with self._autocast():
                out = self.wrapped[spec.name](labeled["data"])
                term = self.ctx.supervised_loss(out, labeled["target"])
            self.ctx.log(f"warmup_loss_{spec.name}", term)
            loss = term if loss is None else loss + term
        yield loss

    def load_pretrained_sources(self) -> dict[str, Path]:
        """Load every ``-pretrained_weights`` source; {network: the source it came from}. Two
        sources that load the same network are an error."""
        loaded_from: dict[str, Path] = {}
        for source in self.pretrained_sources:
            for name in self.load_pretrained_weights(source):
                if name in loaded_from:
                    raise TrainingError(f"-pretrained_weights {loaded_from[name]} and {source} both load network "
                                        f"{name!r}: give one pre-training per kind of network")
                loaded_from[name] = source
        return loaded_from

    def load_pretrained_weights(self, source: str | os.PathLike) -> dict[str, str]:
        """See ``autossl.training.warm_start.load_pretrained_weights``."""
        chosen = warm_start.load_pretrained_weights(self, source)
        self._pretrained_loaded = True
        self._sync_phases()
        return chosen

    # ================================================================== setup
    def _check_specs(self, specs: list[NetworkSpec]) -> list[NetworkSpec]:
        if not specs:
            raise TrainingError(f"--ssl {self.ssl}: the method declares no networks")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise TrainingError(f"--ssl {self.ssl}: duplicate network names {names}")
        for s in specs:
            if s.arch not in ARCHITECTURE_KEYS:
                raise TrainingError(f"--ssl {self.ssl}: network {s.name!r} has arch {s.arch!r} "
                                    f"(one of {', '.join(ARCHITECTURE_KEYS)})")
            if s.copy_of is not None and s.copy_of not in names:
                raise TrainingError(f"--ssl {self.ssl}: network {s.name!r} copies unknown network {s.copy_of!r}")
        inf = self.method.inference_networks()
        unknown = [n for n in inf if n not in names]
        if not inf or unknown:
            raise TrainingError(f"--ssl {self.ssl}: inference networks {inf} must be among {names}")
        if not any(s.trainable for s in specs):
            raise TrainingError(f"--ssl {self.ssl}: no trainable network")
        return specs

    def _architecture(self, arch: str) -> dict:
        try:
            return architecture_entry(self.cfg, arch, f"plans {self.plans_identifier!r}, configuration "
                                                      f"{self.configuration!r}")
        except ArchitectureError as e:
            raise TrainingError(str(e)) from None

    def _deep_supervision_scales(self) -> list[list[float]]:
        dim = len(self.patch_size)
        if not any(s.arch == "cnn" for s in self.specs):
            return [[1.0] * dim]
        strides = self.cfg.get("pool_op_kernel_sizes") or self._architecture("cnn")["arch_kwargs"].get("strides")
        if not strides:
            return [[1.0] * dim]
        strides = [[s] * dim if isinstance(s, int) else list(s) for s in strides]
        return [list(map(float, i)) for i in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1] or [[1.0] * dim]

    def initialize(self) -> None:
        """Networks, optimisers, schedules, the loss and the method context (no data loading)."""
        if self._initialized:
            return
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        built: dict[str, nn.Module] = {}
        pending = list(self.specs)
        while pending:  # copies after their sources
            progressed = False
            for spec in list(pending):
                if spec.copy_of is not None and spec.copy_of not in built:
                    continue
                torch.manual_seed(self.seed + spec.seed_offset)
                net = build_network(self._architecture(spec.arch), self.num_input_channels, self.num_heads,
                                    deep_supervision=spec.arch == "cnn")
                if spec.dropout > 0:
                    if spec.arch != "cnn":
                        raise TrainingError(f"--ssl {self.ssl}: network {spec.name!r} asks for dropout, which "
                                            f"only the planned cnn takes")
                    self._dropout_hooks += add_dropout(net, spec.dropout)
                if spec.copy_of is not None:
                    net.load_state_dict(built[spec.copy_of].state_dict())
                if self.device.type == "cpu":  # same normalisation, faster CPU kernel
                    instance_norm_as_group_norm(net)
                built[spec.name] = net.to(self.device)
                pending.remove(spec)
                progressed = True
            if not progressed:
                raise TrainingError(f"--ssl {self.ssl}: circular copy_of between networks {[s.name for s in pending]}")
        self.networks = {s.name: built[s.name] for s in self.specs}
        for spec in self.specs:
            net = self.networks[spec.name]
            if spec.trainable:
                self.optimizers[spec.name] = build_optimizer(net, spec.arch, self.optimizer_configs)
                cycles = self.rounds if self.method.restart_lr_each_round else 1
                self.schedulers[spec.name] = build_schedule(self.optimizers[spec.name], spec.arch, self.total_steps,
                                                            cycles, self.optimizer_configs)
                wrapped = torch.compile(net) if self.compile else net
                if self.dist.is_ddp:
                    wrapped = nn.parallel.DistributedDataParallel(
                        wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                        find_unused_parameters=True)
                self.wrapped[spec.name] = wrapped
            else:
                net.eval()
                net.requires_grad_(False)
                self.wrapped[spec.name] = net
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" and \
            self.amp_dtype == torch.float16 else None
        if self.label_manager.has_regions:
            loss = RegionSupervisedLoss(batch_dice=bool(self.cfg.get("batch_dice", False)),
                                        has_ignore=self.label_manager.has_ignore_label)
        else:
            loss = SupervisedLoss(batch_dice=bool(self.cfg.get("batch_dice", False)),
                                  ignore_index=self.label_manager.ignore_label)
        self._rng = torch.Generator()
        self._rng.manual_seed(self.seed + 7919 * self.dist.rank)
        self._strong = _LazyStrongAugment(self.seed + 104729 + self.dist.rank)
        self.ctx = TrainingContext(
            networks=self.wrapped, total_steps=self.total_steps, num_classes=self.num_heads, device=self.device,
            supervised_loss=loss, strong_augment=self._strong, autocast=self._autocast,
            predict_unlabeled=self.predict_unlabeled, set_pseudo_labels=self.set_pseudo_labels,
            unlabeled_cases=[], step=0, rng=self._rng)
        self._initialized = True
        self._sync_phases()

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _seed_everything(self) -> None:
        """Global RNGs from (seed, rank, step): every rank draws different patches."""
        s = int(np.random.SeedSequence([self.seed, self.dist.rank, self.current_step]).generate_state(1)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    # ================================================================== data
    def _do_split(self) -> None:
        cases = storage.list_cases(self.data_folder)
        self.tr_keys, self.val_keys = split_for_fold(self.preprocessed_base, cases, self.fold)
        if not self.tr_keys:
            raise TrainingError(f"fold {self.fold}: no training cases")
        if self.uses_unlabeled or self.rounds > 1:
            self.unlabeled_keys = storage.list_cases(self.unlabeled_data_folder)
            if self.uses_unlabeled and not self.unlabeled_keys:
                raise TrainingError(
                    f"--ssl {self.ssl} trains on unlabelled images but {self.unlabeled_data_folder} holds none: put "
                    f"them in imagesTrUnlabeled/ and rerun autossl_plan_and_preprocess -d {self.dataset_name}")
        if self.ctx is not None:
            self.ctx.unlabeled_cases = list(self.unlabeled_keys)
            if (self.uses_unlabeled or self.rounds > 1) and not self.label_manager.has_regions \
                    and self._single_components is None:
                self._single_components = self._single_component_classes()
                self.ctx.single_component_classes, self.ctx.single_component_foreground = self._single_components
                self.ctx.single_component_per_slice = len(self.patch_size) == 2

    def _single_component_classes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(classes, foreground): the classes the labelled training cases show to be one connected
        structure each (per slice for a 2d configuration), and the foreground classes when their
        union is one structure too: what pseudo-label cleaning may reduce to its largest component."""
        from autossl.ssl.pseudo_label_cleaning import single_structure

        per_slice = len(self.patch_size) == 2
        segs = (storage.load_case(self.data_folder, k, mmap=False)[1] for k in self.tr_keys)
        found, foreground = single_structure((s for s in segs if s is not None), self.label_manager.foreground_labels,
                                             per_slice=per_slice)
        where = " per slice" if per_slice else ""
        self.logger.print(f"pseudo-label cleaning: the labelled cases show classes {list(found)} as one connected "
                          f"structure{where}" if found else
                          "pseudo-label cleaning: no class is one connected structure in the labelled cases")
        if foreground:
            self.logger.print(f"pseudo-label cleaning: the foreground (classes {list(foreground)}) is one connected "
                              f"structure{where}: its largest component is kept first")
        return found, foreground

    def _stream_seeds(self, stream: str, n: int) -> list[int]:
        ss = np.random.SeedSequence([self.seed, self.dist.rank, self.current_step, _STREAM_IDS[stream]])
        seeds = [int(s) for s in ss.generate_state(max(1, n))]
        self._loader_seeds[stream] = seeds
        return seeds

    def _start_loaders(self) -> None:
        pin = self.device.type == "cuda"
        dim_ds = self.deep_supervision_scales
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr = LabeledDataLoader(
            PreprocessedCases(self.data_folder, self.tr_keys), self.batch_size, self.geometry.initial_patch_size,
            self.patch_size, self.label_manager.all_labels, self.label_manager.has_ignore_label, self.oversample,
            training_transforms(self.patch_size, self.geometry, dim_ds, self.cfg.get("use_mask_for_norm"),
                                regions, self.label_manager.ignore_label))
        self._loaders["train"] = tr
        self._streams["train"] = BatchStream(tr, self.num_workers, self._stream_seeds("train", self.num_workers), pin)
        if self.val_iterations > 0 and self.val_keys:
            val = LabeledDataLoader(
                PreprocessedCases(self.data_folder, self.val_keys), self.batch_size, self.patch_size, self.patch_size,
                self.label_manager.all_labels, self.label_manager.has_ignore_label, self.oversample,
                validation_transforms(dim_ds, regions, self.label_manager.ignore_label))
            nw = max(1, self.num_workers // 2) if self.num_workers > 0 else 0
            self._loaders["val"] = val
            self._streams["val"] = BatchStream(val, nw, self._stream_seeds("val", nw), pin)
        if self.unlabeled_batch_size > 0:
            self._loaders["unlabeled"] = UnlabeledDataLoader(
                PreprocessedCases(self.unlabeled_data_folder, self.unlabeled_keys, labeled=False),
                self.unlabeled_batch_size, self.geometry.initial_patch_size, self.patch_size,
                weak_transforms(self.patch_size, self.geometry, dim_ds))
            if not self._in_warmup():  # during the warm start no unlabelled batch is drawn
                self._start_unlabeled_stream()

    def _start_unlabeled_stream(self) -> None:
        loader = self._loaders.get("unlabeled")
        if loader is None or "unlabeled" in self._streams:
            return
        self._streams["unlabeled"] = BatchStream(loader, self.num_workers,
                                                 self._stream_seeds("unlabeled", self.num_workers),
                                                 self.device.type == "cuda")

    def _stop_loaders(self) -> None:
        for s in self._streams.values():
            s.close()
        self._streams.clear()

    # ================================================================== SSL helpers for ctx
    def _inference_modules(self) -> list[nn.Module]:
        return [self.networks[n] for n in self.method.inference_networks()]

    @contextmanager
    def _eval_mode(self, networks: list[nn.Module]):
        """Networks in eval mode without deep supervision, restored afterwards."""
        saved = [(n.training, has_deep_supervision(n)) for n in networks]
        try:
            for n in networks:
                n.eval()
                set_deep_supervision(n, False)
            yield
        finally:
            for n, (mode, ds) in zip(networks, saved):
                n.train(mode)
                set_deep_supervision(n, ds)

    def predict_unlabeled(self, cases: list[str] | None = None, mirroring: bool = True) -> dict[str, np.ndarray]:
        """``ctx.predict_unlabeled``: see ``autossl.training.pseudo_labels.predict_unlabeled``."""
        return pseudo_labels.predict_unlabeled(self, cases, mirroring)

    def set_pseudo_labels(self, labels: dict[str, Any]) -> None:
        """``ctx.set_pseudo_labels``: see ``autossl.training.pseudo_labels.hand_to_loader``."""
        pseudo_labels.hand_to_loader(self, labels)

    # ================================================================== checkpoints
    def _checkpoint_state(self) -> dict:
        inf = self.method.inference_networks()
        arch = {s.name: s.arch for s in self.specs}
        return {
            "network_weights": unwrap(self.networks[inf[0]]).state_dict(),
            "networks": {n: unwrap(m).state_dict() for n, m in self.networks.items()},
            "inference_networks": [{"name": n, "arch": arch[n]} for n in inf],
            "network_specs": [{"name": s.name, "arch": s.arch, "trainable": s.trainable, "copy_of": s.copy_of,
                               "seed_offset": s.seed_offset, "dropout": s.dropout} for s in self.specs],
            "optimizer_states": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scheduler_states": {n: s.state_dict() for n, s in self.schedulers.items()},
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "rng_states": capture_rng_states({"ctx": self._rng, "strong": self._strong.generator},
                                             dict(self._loader_seeds)),
            "logging": self.logger.state_dict(),
            "ssl_state": self.method.state_dict(),
            "_best_ema": self._best_ema,
            "current_step": self.current_step,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "warmup_done": self._warmup_done,
            "pretrained_loaded": self._pretrained_loaded,
            "pool_prediction": dict(self.pool_prediction),
            "num_epochs": self.num_epochs,
            "iterations_per_epoch": self.iterations_per_epoch,
            "budget_plan": None if self._budget_plan is None else self._budget_plan.__dict__,
            "init_args": {
                "plans": self.plans, "plans_identifier": self.plans_identifier,
                "configuration": self.configuration, "fold": self.fold, "dataset_json": self.dataset_json,
                "dataset_name": self.dataset_name, "ssl": self.ssl, "ssl_options": self.ssl_options,
                "network": self.network_choice, "seed": self.seed, "unlabeled_ratio": self.unlabeled_ratio,
                "val_iterations": self.val_iterations, "save_every": self.save_every,
            },
            "trainer_name": self.trainer_name,
            "inference_allowed_mirroring_axes": tuple(self.geometry.mirror_axes),
        }

    def save_checkpoint(self, path: str | Path) -> None:
        if self.dist.is_main:
            save_checkpoint(self._checkpoint_state(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.initialize()
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt["trainer_name"] != self.trainer_name:
            raise TrainingError(f"{path} was written by {ckpt['trainer_name']}, not {self.trainer_name}")
        for name, net in self.networks.items():
            if name not in ckpt["networks"]:
                raise TrainingError(f"{path}: no weights for network {name!r}")
            unwrap(net).load_state_dict(ckpt["networks"][name])
        for name, opt in self.optimizers.items():
            if name in ckpt["optimizer_states"]:
                opt.load_state_dict(ckpt["optimizer_states"][name])
        self.current_step = int(ckpt["current_step"])
        self.iterations_per_epoch = int(ckpt.get("iterations_per_epoch", self.iterations_per_epoch))
        if self.max_epochs is not None and self.budget_s is None:  # --c --epochs N: a new length
            self.num_epochs = self.max_epochs
            self.total_steps = max(self.current_step, self.num_epochs * self.iterations_per_epoch)
        else:
            self.num_epochs = int(ckpt.get("num_epochs", self.num_epochs))
            self.total_steps = int(ckpt["total_steps"])
        for name, sch in self.schedulers.items():
            if name in ckpt["scheduler_states"]:
                sch.load_state_dict(ckpt["scheduler_states"][name])
            sch.set_total_steps(self.total_steps)
            sch.step(self.current_step)
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.logger.load_state_dict(ckpt["logging"])
        self.method.load_state_dict(ckpt.get("ssl_state") or {})
        self._best_ema = ckpt["_best_ema"]
        bp = ckpt.get("budget_plan")
        self._budget_plan = BudgetPlan(**bp) if bp else None
        self._budget_decided = True  # a resumed run keeps the length it planned
        self.ctx.step = self.current_step
        self.ctx.total_steps = self.total_steps
        self.warmup = float(ckpt.get("warmup", self.warmup))  # a resumed run keeps its phases
        self._warmup_done = bool(ckpt.get("warmup_done", self.warmup_steps == 0))
        self._pretrained_loaded = bool(ckpt.get("pretrained_loaded", False))
        self.pool_prediction.update(ckpt.get("pool_prediction") or {})
        self._sync_phases()
        if not self.dist.is_ddp:  # under DDP every rank reseeds from (seed, rank, step) instead
            try:
                restore_rng_states(ckpt["rng_states"], {"ctx": self._rng, "strong": self._strong.generator})
            except Exception as e:  # rng state from another torch build: continue with fresh seeds
                self.logger.print(f"could not restore the random states ({e}); continuing with fresh seeds")

    # ================================================================== the run
    def run(self, continue_training: bool = False, validation_only: bool = False) -> None:
        """Train (or continue with ``continue_training``), write checkpoint_final and validate the
        held-out fold. ``validation_only`` reruns the final validation from checkpoint_final."""
        self._t_start = time.time()
        self.initialize()
        final = self.output_folder / "checkpoint_final.pth"
        latest = self.output_folder / "checkpoint_latest.pth"
        try:
            if validation_only:
                if not final.is_file():
                    raise TrainingError(f"--val needs {final}; train first")
                self.load_checkpoint(final)
                self._do_split()
                self.perform_final_validation()
                return
            if continue_training and final.is_file():
                self.logger.print(f"{final} exists: training is finished, nothing to continue")
                self.load_checkpoint(final)
                self._do_split()
                if self.fold != "all" and not (self.output_folder / "validation" / "summary.json").is_file():
                    self.perform_final_validation()
                return
            if continue_training and latest.is_file():
                self.load_checkpoint(latest)
                self.logger.print(f"continuing from {latest} at step {self.current_step}/{self.total_steps}")
            elif continue_training:
                self.logger.print(f"--c: no checkpoint in {self.output_folder}; starting a new training")
            if self.current_step == 0 and self.pretrained_sources:
                self.load_pretrained_sources()
            elif self.current_step == 0:
                hint = self.method.pretrain_hint or warm_start.default_pretrain_hint(self.specs)
                if hint:
                    self.logger.print(f"note: no -pretrained_weights; {hint}")
            if self.current_step == 0 or self.dist.is_ddp:
                self._seed_everything()
            self._do_split()
            self._on_train_start()
            self.method.setup(self.ctx)  # after the loaders exist: a resumed method may hand pseudo-labels back
            with self._stop_on_signals():
                self.train()
            self._on_train_end()
            if self._stop_signal is not None:  # the signal came during the last epoch: training is done
                name = signal.Signals(self._stop_signal).name
                msg = (f"{name} received: training finished ({self.output_folder / 'checkpoint_final.pth'} "
                       f"written); the final validation is left to --c")
                self.logger.print(msg)
                raise TrainingInterrupted(self._stop_signal, msg)
            if self.fold != "all":
                self.perform_final_validation()
        finally:
            self._stop_loaders()

    def _on_train_start(self) -> None:
        if self.dist.is_main:
            save_json(self.plans, self.output_folder_base / "plans.json")
            save_json(self.dataset_json, self.output_folder_base / "dataset.json")
            fp = self.preprocessed_base / "dataset_fingerprint.json"
            if fp.is_file():
                shutil.copy(fp, self.output_folder_base / "dataset_fingerprint.json")
        self._start_loaders()
        self.logger.print(
            f"{self.trainer_name} on {self.dataset_name} {self.configuration} fold {self.fold}: "
            f"{len(self.tr_keys)} training / {len(self.val_keys)} validation cases"
            + (f", {len(self.unlabeled_keys)} unlabelled" if self.unlabeled_keys else "")
            + f"; batch {self.batch_size}" + (f" + {self.unlabeled_batch_size} unlabelled" if self.unlabeled_batch_size
                                               else "")
            + f", patch {self.patch_size}, device {self.device}, {self.dist.world_size} process(es), "
              f"{self.num_workers} loader worker(s), "
            + (f"{str(self.amp_dtype).replace('torch.', '')} autocast" if self.amp_dtype is not None else "float32"))
        self.logger.print(f"configuration {self.configuration} of {self.plans_identifier}: "
                          f"{json.dumps(self.cfg, default=str)}", console=False)
        self.logger.print(f"method {self.ssl}: options {self.ssl_options}, networks "
                          f"{[(s.name, s.arch, s.trainable) for s in self.specs]}, inference "
                          f"{self.method.inference_networks()}, {self.total_steps} steps", console=False)
        self._save_debug_json()
        ddp.barrier()

    def _save_debug_json(self) -> None:
        if not self.dist.is_main:
            return
        info = {
            "trainer_name": self.trainer_name, "dataset": self.dataset_name, "plans": self.plans_identifier,
            "configuration": self.configuration, "fold": self.fold, "ssl": self.ssl, "ssl_options": self.ssl_options,
            "network": self.network_choice, "device": str(self.device), "world_size": self.dist.world_size,
            "batch_size_per_rank": self.batch_size, "oversample_foreground_percent": self.oversample,
            "unlabeled_batch_size_per_rank": self.unlabeled_batch_size, "unlabeled_ratio": self.unlabeled_ratio,
            "patch_size": self.patch_size, "initial_patch_size": self.geometry.initial_patch_size,
            "rotation": self.geometry.rotation, "dummy_2d": self.geometry.dummy_2d,
            "mirror_axes": self.geometry.mirror_axes, "deep_supervision_scales": self.deep_supervision_scales,
            "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations_per_epoch,
            "total_steps": self.total_steps, "val_iterations": self.val_iterations, "rounds": self.rounds,
            "warmup_steps": self.warmup_steps, "pool_prediction": dict(self.pool_prediction),
            "pretrained_weights": ([str(p) for p in self.pretrained_sources] if len(self.pretrained_sources) > 1
                                   else str(self.pretrained_weights) if self.pretrained_weights else None),
            "budget_s": self.budget_s, "seed": self.seed, "num_workers": self.num_workers, "compile": self.compile,
            "amp": self.amp_dtype is not None,
            "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "grad_scaler": self.grad_scaler is not None, "save_every": self.save_every,
            "networks": [{"name": s.name, "arch": s.arch, "trainable": s.trainable, "copy_of": s.copy_of,
                          "seed_offset": s.seed_offset, "dropout": s.dropout,
                          "class": type(self.networks[s.name]).__name__,
                          "parameters": sum(p.numel() for p in self.networks[s.name].parameters())}
                         for s in self.specs],
            "inference_networks": self.method.inference_networks(),
            "train_cases": self.tr_keys, "val_cases": self.val_keys, "num_unlabeled_cases": len(self.unlabeled_keys),
            "torch": torch.__version__, "hostname": os.uname().nodename if hasattr(os, "uname") else "",
        }
        save_json(info, self.output_folder / "debug.json")

    # ================================================================== SIGTERM / SIGINT
    @contextmanager
    def _stop_on_signals(self):
        """During ``train()``: SIGTERM and SIGINT ask the step loop to stop after the current step
        (``_stop_if_asked``) instead of killing the process mid-step. A second signal acts as usual
        (the first one restores the previous handlers). Not under DDP, where every rank would have
        to stop at the same step, nor outside the main thread (Python handles signals there only)."""
        if self.dist.is_ddp or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            self._stop_signal = signum
            for s, h in previous.items():
                signal.signal(s, h)
        self._stop_signal = None
        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_if_asked(self, save: bool = True) -> None:
        """Between two steps, after SIGTERM/SIGINT: write checkpoint_latest at this step (atomic,
        so the previous one stays whole until the new one is complete), stop the loader workers and
        raise ``TrainingInterrupted``. ``save=False`` keeps the last checkpoint as it is (the signal
        came between the last step of an epoch and its validation and logging)."""
        signum = self._stop_signal
        if signum is None:
            return
        name = signal.Signals(signum).name
        latest = self.output_folder / "checkpoint_latest.pth"
        if save and not self._budget_decided:
            save = False  # the budget has not measured the speed yet: nothing of this run is worth resuming
        if save and self.current_step > 0:
            self.save_checkpoint(latest)
            what = f"{latest} written at step {self.current_step}/{self.total_steps}"
        else:
            what = (f"the last checkpoint ({latest}) is kept" if latest.is_file()
                    else "no checkpoint written")
        self._stop_loaders()
        msg = f"{name} received: training stopped after step {self.current_step}; {what}; continue with --c"
        self.logger.print(msg)
        raise TrainingInterrupted(signum, msg)

    def _round_boundaries(self) -> list[int]:
        return round_boundaries(self.total_steps, self.rounds)

    def train(self) -> None:
        """The step loop: epochs of ``iterations_per_epoch`` steps until ``total_steps``."""
        steps_this_session = 0
        measured: list[float] = []  # budget: durations of the timed steps (data + step, no validation)
        epoch_times: list[float] = []
        while self.current_step < self.total_steps:
            epoch = self.current_step // self.iterations_per_epoch
            epoch_start = time.time()
            for spec in self.specs:  # non-trainable networks keep the mode the method gives them
                if spec.trainable:
                    self.networks[spec.name].train()
            lrs = {n: s.get_last_lr() for n, s in self.schedulers.items()}
            losses: list[float] = []
            it = self.current_step - epoch * self.iterations_per_epoch
            while it < self.iterations_per_epoch and self.current_step < self.total_steps:
                self._stop_if_asked()
                t_it = time.time()
                warm = self._in_warmup()
                if not warm and self.warmup_steps > 0 and not self._warmup_done:
                    self._end_warmup()
                try:
                    lab = next(self._streams["train"])
                    unl = next(self._streams["unlabeled"]) if "unlabeled" in self._streams and not warm else None
                except Exception:  # e.g. workers killed by the same signal: nothing of this step happened yet
                    self._stop_if_asked()
                    raise
                losses.append(self._train_iteration(lab, unl, warm))
                it += 1
                steps_this_session += 1
                if self.current_step in self._round_boundaries():
                    r = self._round_boundaries().index(self.current_step)
                    self.logger.print(f"end of round {r + 1}/{self.rounds} at step {self.current_step}")
                    self.method.on_round_end(r, self.ctx)
                if not self._budget_decided and steps_this_session > BUDGET_WARMUP_STEPS:
                    measured.append(time.time() - t_it)
                    if len(measured) == BUDGET_MEASURE_STEPS:
                        apply_budget(self, float(np.mean(measured)))
            if self.current_step <= self.warmup_steps and self.warmup_steps > 0:
                # during the warm start an EMA teacher is its student: validation, checkpoints
                # and snapshots then show the network being trained, not its initialisation
                self._copy_sources()
            try:
                val_loss, dice = self._validate_epoch()
            except Exception:
                self._stop_if_asked(save=False)  # the epoch cannot be logged: keep the last checkpoint
                raise
            self._end_epoch(epoch, epoch_start, losses, val_loss, dice, lrs, epoch_times)

    def _train_iteration(self, lab: dict, unl: dict | None, warmup: bool = False) -> float:
        lab = _to_device(lab, self.device)
        unl = _to_device(unl, self.device)
        gen = self._warmup_step(lab) if warmup else self.method.training_step(lab, unl, self.ctx)
        total = 0.0
        n = 0
        while True:
            with self._autocast():
                try:
                    loss = next(gen)
                except StopIteration:
                    break
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
            active = [n_ for n_, o in self.optimizers.items() if has_gradients(o)]
            for name in active:
                if self.grad_scaler is not None:
                    self.grad_scaler.unscale_(self.optimizers[name])
                clip_gradients(self.networks[name], GRAD_CLIP)
            for name in active:
                if self.grad_scaler is not None:
                    self.grad_scaler.step(self.optimizers[name])
                else:
                    self.optimizers[name].step()
            if self.grad_scaler is not None and active:
                self.grad_scaler.update()
            if not warmup:
                self.method.after_optimizer_step(self.ctx)
            total += float(loss.detach().float().item())
            n += 1
        if n == 0:
            raise TrainingError(f"--ssl {self.ssl}: training_step yielded no loss")
        self.current_step += 1
        self.ctx.step = self.current_step
        for s in self.schedulers.values():
            s.step(self.current_step)
        return total

    @torch.no_grad()
    def _validate_epoch(self) -> tuple[float, list[float]]:
        n_fg = self.num_heads - 1 if not self.label_manager.has_regions else self.num_heads
        if "val" not in self._streams:
            return float("nan"), [float("nan")] * n_fg
        nets = [self.wrapped[n] for n in self.method.inference_networks()]
        plain = self._inference_modules()
        modes = [m.training for m in plain]
        for m in plain:
            m.eval()
        tp = torch.zeros(n_fg, dtype=torch.float64, device=self.device)
        fp, fn = torch.zeros_like(tp), torch.zeros_like(tp)
        loss_sum = 0.0
        try:
            for _ in range(self.val_iterations):
                batch = _to_device(next(self._streams["val"]), self.device)
                with self._autocast():
                    outputs = [net(batch["data"]) for net in nets]
                    loss = sum(self.ctx.supervised_loss(o, batch["target"]) for o in outputs) / len(outputs)
                loss_sum += float(loss.float().item())
                main = [main_output(o).float() for o in outputs]
                if self.label_manager.has_regions:
                    probs = sum(torch.sigmoid(m) for m in main) / len(main)
                else:
                    probs = sum(torch.softmax(m, 1) for m in main) / len(main)
                a, b, c = tp_fp_fn(probs, batch["target"][0], has_regions=self.label_manager.has_regions,
                                   ignore_label=self.label_manager.ignore_label)
                tp += a
                fp += b
                fn += c
        finally:
            for m, mode in zip(plain, modes):
                m.train(mode)
        stats = torch.cat([tp, fp, fn, torch.tensor([loss_sum, self.val_iterations], dtype=torch.float64,
                                                    device=self.device)])
        stats = ddp.all_reduce_sum(stats)
        tp, fp, fn = stats[:n_fg], stats[n_fg:2 * n_fg], stats[2 * n_fg:3 * n_fg]
        return float(stats[-2] / stats[-1]), dice_from_counts(tp.cpu(), fp.cpu(), fn.cpu())

    def _end_epoch(self, epoch: int, epoch_start: float, losses: list[float], val_loss: float, dice: list[float],
                   lrs: dict[str, float], epoch_times: list[float]) -> None:
        scalars = self.ctx.pop_logged()
        mine = {"train_loss": float(np.mean(losses)) if losses else float("nan"), **scalars}
        gathered = ddp.all_gather_objects(mine)
        merged: dict[str, float] = {}
        for k in {k for g in gathered for k in g}:
            vals = [g[k] for g in gathered if k in g]
            merged[k] = float(np.mean(vals))
        train_loss = merged.pop("train_loss")
        finite = [d for d in dice if not math.isnan(d)]
        mean_dice = float(np.mean(finite)) if finite else float("nan")
        h = self.logger.history
        prev = h["ema_fg_dice"][-1] if h["ema_fg_dice"] else None
        if prev is None or math.isnan(prev):
            ema = mean_dice
        elif math.isnan(mean_dice):
            ema = prev
        else:
            ema = 0.9 * prev + 0.1 * mean_dice
        epoch_time = time.time() - epoch_start
        epoch_times.append(epoch_time)
        self.logger.log_epoch(train_loss=train_loss, val_loss=val_loss, pseudo_dice=dice, ema_fg_dice=ema,
                              epoch_time=epoch_time, step=self.current_step, lrs=lrs, scalars=merged,
                              end_timestamp=time.time())
        remaining_epochs = math.ceil((self.total_steps - self.current_step) / self.iterations_per_epoch)
        eta = remaining_epochs * float(np.mean(epoch_times[-5:]))
        num_epochs = math.ceil(self.total_steps / self.iterations_per_epoch)
        parts = [f"epoch {epoch + 1}/{num_epochs} (step {self.current_step}/{self.total_steps}):",
                 f"train_loss {train_loss:.4f}", f"val_loss {val_loss:.4f}",
                 "pseudo_dice [" + ", ".join(f"{d:.4f}" for d in dice) + "]", f"ema_dice {ema:.4f}"]
        parts += [f"{k} {v:.4g}" for k, v in sorted(merged.items())]
        parts += ["lr " + ", ".join(f"{k}={v:.3g}" for k, v in lrs.items()),
                  f"epoch_time {epoch_time:.1f}s", f"ETA {_fmt_time(eta)}"]
        self.logger.print(" ".join(parts))
        if not math.isnan(ema) and (self._best_ema is None or ema > self._best_ema):
            self._best_ema = ema
            self.logger.print(f"new best EMA pseudo-Dice {ema:.4f}")
            self.save_checkpoint(self.output_folder / "checkpoint_best.pth")
        done = self.current_step >= self.total_steps
        if not done and (epoch + 1) % self.save_every == 0:
            self.save_checkpoint(self.output_folder / "checkpoint_latest.pth")
        if self.snapshot_every > 0 and (epoch + 1) % self.snapshot_every == 0 and not done:
            self.save_checkpoint(self.output_folder / f"checkpoint_step{self.current_step}.pth")
        # progress.png every epoch, unless drawing it would take more than ~1/6 of the time
        if self.dist.is_main and (done or time.time() - self._last_plot[0] >= 5 * self._last_plot[1]):
            t_plot = time.time()
            try:
                self.logger.plot(self.output_folder / "progress.png", tuple(self.method.scalars))
            except Exception as e:  # plotting must never end a run
                self.logger.print(f"could not draw progress.png: {e}")
            self._last_plot = (time.time(), time.time() - t_plot)

    def _on_train_end(self) -> None:
        self.save_checkpoint(self.output_folder / "checkpoint_final.pth")
        if self.dist.is_main:
            (self.output_folder / "checkpoint_latest.pth").unlink(missing_ok=True)
            shutil.rmtree(self.output_folder / "pseudo_labels", ignore_errors=True)
        self._stop_loaders()
        ddp.barrier()
        k = self.method.optimizer_steps_per_iteration
        extra = f" ({self.current_step * k} optimiser steps per network)" if k != 1 else ""
        elapsed = _fmt_time(time.time() - self._t_start)
        self.logger.print(f"training done: {self.current_step} steps{extra} in {elapsed}")
        if self.pool_prediction["predictions"]:
            pp = self.pool_prediction
            self.logger.print(f"the method predicted the unlabelled pool {pp['predictions']} time(s): "
                              f"{pp['network_inputs']} patches through a network, {_fmt_time(pp['seconds'])}")
        self._save_debug_json()  # now with the run's pool predictions

    # ================================================================== final validation
    def perform_final_validation(self) -> dict | None:
        """Predict the fold's validation cases with the real predictor into fold_X/validation/ and
        evaluate them against gt_segmentations into validation/summary.json."""
        return final_validation.run_final_validation(self)

    def make_predictor(self, allow_tqdm: bool = False, use_mirroring: bool = True) -> Predictor:
        """A Predictor around the live inference networks (the final validation, pseudo-labels)."""
        names = self.method.inference_networks()
        arch = {s.name: s.arch for s in self.specs}
        predictor = Predictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring, device=self.device,
                              verbose=False, allow_tqdm=allow_tqdm)
        predictor.manual_initialization(None, [{"name": n, "arch": arch[n]} for n in names], self.plans,
                                        self.configuration, self.dataset_json, self.geometry.mirror_axes,
                                        networks={n: self.networks[n] for n in names},
                                        trainer_name=self.trainer_name)
        return predictor


class _LazyStrongAugment:
    """``ctx.strong_augment``: StrongIntensityAugment, imported on first use."""

    def __init__(self, seed: int):
        self.seed = seed
        self._impl = None
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def _get(self):
        if self._impl is None:
            try:
                from autossl.components.augmentation.strong import StrongIntensityAugment
            except ImportError as e:
                raise TrainingError(f"ctx.strong_augment needs autossl.components.augmentation.strong ({e})") from e
            self._impl = StrongIntensityAugment()
            self._impl.generator = self.generator
        return self._impl

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._get()(x, *args, **kwargs)
