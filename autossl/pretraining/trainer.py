"""``autossl_pretrain``: self-supervised pre-training of the planned CNN's encoder (or, with
``network="transformer"``, of the planned transformer's; a dense method such as ``mae`` trains
the whole planned U-Net, decoder included).

The encoder is the configuration's planned U-Net's ``net.encoder`` (built by
``build_network`` from the plans, so its keys are those of every CNN a trainer builds), global
average pooling of its deepest stage, and the method's heads. For the transformer it is
Primus' / Primus2D's patch embedding and EVA blocks without the decoder
(``networks.tokens.TransformerEncoder``: keys ``down_projection.*``, ``eva.*`` as in the full
network), the output tokens on their grid pooled the same way. AdamW with a linear warm-up and
a cosine decay. Every epoch: the mean loss and the method's health figures (``embedding_std``:
the per-dimension std of the normalised embeddings, near 1/sqrt(d) when healthy, 0 at
collapse), the learning rate, the epoch time and an ETA in the log and in ``progress.png``;
``checkpoint_latest.pth`` (atomic) every epoch, ``checkpoint_final.pth`` at the end. ``--c``
continues from ``checkpoint_latest.pth``. Output:
``$autossl_results/DatasetXXX/autosslPretrainer_<method>[_transformer]__<plans>__<config>/fold_all/``.
"""
from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from autossl import paths
from autossl.components.augmentation.pipelines import augmentation_geometry
from autossl.components.budget import parse_budget
from autossl.components.checkpoint import capture_rng_states, restore_rng_states
from autossl.components.dataloading.augmenter import BatchStream, default_num_workers
from autossl.components.errors import TrainingError
from autossl.components.logger import TrainingLogger
from autossl.components.resolve import resolve_configuration, resolve_device
from autossl.networks.build import ArchitectureError, architecture_entry, build_network
from autossl.networks.tokens import TransformerEncoder
from autossl.pretraining.base import StepContext
from autossl.pretraining.registry import create_method, get_method_class
from autossl.pretraining.views import ImageCases, ViewLoader
from autossl.utilities.dataset_name import find_dataset_name
from autossl.utilities.file_io import UnsafeCheckpointError, load_json, load_torch_safely, save_json, save_torch
from autossl.utilities.label_handling import LabelManager

PRETRAINING_FORMAT = 1


NETWORKS = ("cnn", "transformer")


def pretrainer_name(method: str, network: str = "cnn") -> str:
    return f"autosslPretrainer_{method}" + ("_transformer" if network == "transformer" else "")


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Pretrainer:
    def __init__(self, dataset, configuration: str, method: str, *, plans: str = "autosslPlans",
                 method_options: dict | None = None, epochs: int = 100, iterations_per_epoch: int = 250,
                 batch_size: int | None = None, lr: float | None = None, weight_decay: float = 1e-4,
                 warmup_epochs: float = 0.1, budget=None, device=None, seed: int = 12345,
                 num_workers: int | None = None, verbose: bool = True, network: str = "cnn"):
        if epochs < 1 or iterations_per_epoch < 1:
            raise TrainingError("--epochs and --iterations-per-epoch must be >= 1")
        if network not in NETWORKS:
            raise TrainingError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
        self.network = network
        self.configuration, self.plans_identifier, self.method_name = configuration, plans, method
        self.method_options = dict(method_options or {})
        self.num_epochs, self.iterations_per_epoch = int(epochs), int(iterations_per_epoch)
        self.budget_s = parse_budget(budget) if budget not in (None, "", 0) else None
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        try:
            self.dataset_name = find_dataset_name(dataset)
        except FileNotFoundError as e:
            raise TrainingError(f"{e}; run autossl_plan_and_preprocess -d {dataset} first") from None
        base = paths.preprocessed_dir() / self.dataset_name
        plans_file = base / f"{plans}.json"
        if not plans_file.is_file():
            raise TrainingError(f"{plans_file} does not exist: run autossl_plan_and_preprocess -d {dataset} "
                                f"-c {configuration} (plans {plans!r})")
        self.plans = load_json(plans_file)
        self.dataset_json = load_json(base / "dataset.json")
        try:
            self.cfg = resolve_configuration(self.plans, configuration)
        except (KeyError, ValueError) as e:
            raise TrainingError(f"{plans_file}: {e}") from None
        try:
            self.architecture = architecture_entry(self.cfg, network, f"{plans_file}: configuration {configuration!r}")
        except ArchitectureError as e:
            raise TrainingError(str(e)) from None
        self.patch_size = tuple(int(p) for p in self.cfg["patch_size"])
        self.batch_size = max(2, int(batch_size or self.cfg["batch_size"]))  # contrast needs two images
        self.data_folder = base / self.cfg["data_identifier"]
        try:
            self.cases = ImageCases(self.data_folder)
        except FileNotFoundError as e:
            raise TrainingError(f"{e}; run autossl_plan_and_preprocess -d {dataset} -c {configuration}") from None
        self.num_input_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        self.num_heads = LabelManager.from_dataset_json(self.dataset_json).num_segmentation_heads

        torch.manual_seed(self.seed)
        try:
            # a dense method (mae) trains the whole U-Net, its heads reconstructing the input channels
            self.whole_network = network == "cnn" and getattr(get_method_class(method), "whole_network", False)
            heads = self.num_input_channels if self.whole_network else self.num_heads
            net = build_network(self.architecture, self.num_input_channels, heads,
                                deep_supervision=not self.whole_network)
            if network == "transformer":
                encoder = TransformerEncoder(net)
            elif hasattr(net, "encoder") and hasattr(net.encoder, "output_channels"):
                encoder = net if self.whole_network else net.encoder
            else:
                raise TrainingError(f"{self.architecture['network_class_name']}: no U-Net encoder to pre-train")
            self.method = create_method(method, encoder, num_samples=len(self.cases), **self.method_options)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.method.to(self.device)
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.lr = float(lr if lr is not None else self.method.default_lr)
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=weight_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.current_step = 0
        self.history: dict = {"loss": [], "lr": [], "epoch_time": [], "scalars": {}}
        self._budget_decided = self.budget_s is None

        self.output_folder_base = paths.results_dir() / self.dataset_name / \
            f"{pretrainer_name(method, network)}__{plans}__{configuration}"
        self.output_folder = self.output_folder_base / "fold_all"
        self.output_folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
        self.logger = TrainingLogger(self.output_folder / f"training_log_{stamp}.txt", echo=verbose)

    # ------------------------------------------------------------------ schedule
    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    def lr_at(self, step: int) -> float:
        warm = max(1, int(round(self.warmup_epochs * self.total_steps)))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, self.total_steps - warm)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    # ------------------------------------------------------------------ checkpoints
    def encoder_state(self) -> dict:
        """The encoder's weights under the keys of the full planned network: ``encoder.*`` of the
        U-Net, or the transformer's own ``down_projection.*``, ``eva.*`` (``register_tokens``);
        a whole-network method adds the U-Net's decoder (``decoder.stages.*``,
        ``decoder.transpconvs.*``; not its heads, nor the encoder's second registration
        ``decoder.encoder.*``)."""
        if self.whole_network:
            return {k: v for k, v in self.method.net.state_dict().items()
                    if not k.startswith(("decoder.seg_layers.", "decoder.encoder."))}
        sd = self.method.encoder.state_dict()
        return sd if self.network == "transformer" else {f"encoder.{k}": v for k, v in sd.items()}

    def state(self) -> dict:
        return {
            "pretraining": PRETRAINING_FORMAT, "trainer_name": pretrainer_name(self.method_name, self.network),
            "method": self.method_name, "method_options": self.method_options, "network": self.network,
            "encoder": self.encoder_state(),
            "method_state": self.method.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "current_step": self.current_step, "num_epochs": self.num_epochs,
            "iterations_per_epoch": self.iterations_per_epoch, "lr": self.lr, "history": self.history,
            "rng_states": capture_rng_states(), "dataset": self.dataset_name, "plans_identifier": self.plans_identifier,
            "configuration": self.configuration, "architecture": self.architecture,
            "num_input_channels": self.num_input_channels, "patch_size": list(self.patch_size),
        }

    def save(self, name: str) -> None:
        save_torch(self.state(), self.output_folder / name)

    def load(self, path: Path) -> None:
        try:
            ckpt = load_torch_safely(path)
        except UnsafeCheckpointError as e:
            raise TrainingError(str(e)) from None
        if ckpt.get("method") != self.method_name or ckpt.get("plans_identifier") != self.plans_identifier or \
                ckpt.get("network", "cnn") != self.network:
            raise TrainingError(f"{path}: a checkpoint of {ckpt.get('method')!r} ({ckpt.get('network', 'cnn')}) with "
                                f"plans {ckpt.get('plans_identifier')!r}, not of this run")
        self.method.load_state_dict(ckpt["method_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.current_step = int(ckpt["current_step"])
        self.num_epochs = int(ckpt["num_epochs"])
        self.iterations_per_epoch = int(ckpt["iterations_per_epoch"])
        self.history = ckpt["history"]
        restore_rng_states(ckpt["rng_states"])
        self._budget_decided = True
        self.logger.print(f"continuing from {path.name} at step {self.current_step}/{self.total_steps}")

    # ------------------------------------------------------------------ run
    def run(self, continue_training: bool = False) -> Path:
        final = self.output_folder / "checkpoint_final.pth"
        latest = self.output_folder / "checkpoint_latest.pth"
        if continue_training and final.is_file():
            self.load(final)
        elif continue_training and latest.is_file():
            self.load(latest)
        else:
            np.random.seed(self.seed)
        for name, obj in (("plans.json", self.plans), ("dataset.json", self.dataset_json)):
            save_json(obj, self.output_folder_base / name)
        trained = self.method.net if self.whole_network else self.method.encoder
        n_params = sum(p.numel() for p in trained.parameters())
        part = "encoder and decoder" if self.whole_network else "encoder"
        self.logger.print(f"pre-training {self.method_name} on {len(self.cases)} images of {self.dataset_name} "
                          f"({self.configuration} of {self.plans_identifier}): {self.network} {part} of "
                          f"{self.architecture['network_class_name'].split('.')[-1]} ({n_params} parameters), "
                          f"batch {self.batch_size} x {self.method.num_views} views of {list(self.patch_size)}, "
                          f"{self.num_epochs} epochs x {self.iterations_per_epoch} iterations, device {self.device}")
        if self.current_step < self.total_steps:
            self.train()
        self.save("checkpoint_final.pth")
        latest.unlink(missing_ok=True)
        self.logger.print(f"done: {final}")
        return final

    def train(self) -> None:
        loader = ViewLoader(self.cases, self.batch_size, self.patch_size, augmentation_geometry(self.patch_size),
                            self.method.num_views)
        seeds = [int(s) for s in np.random.SeedSequence([self.seed, self.current_step]).generate_state(
            max(1, self.num_workers))]
        stream = BatchStream(loader, self.num_workers, seeds, self.device.type == "cuda")
        t_start, steps_timed = time.time(), 0
        self.method.train()
        try:
            while self.current_step < self.total_steps:
                epoch = self.current_step // self.iterations_per_epoch
                t0, losses, scalars = time.time(), [], {}
                while self.current_step < self.total_steps:
                    batch = next(stream)
                    views = [v.to(self.device, non_blocking=True) for v in batch["views"]]
                    ctx = StepContext(self.current_step, self.total_steps, batch["indices"], len(self.cases))
                    for g in self.optimizer.param_groups:
                        g["lr"] = self.lr_at(self.current_step)
                    loss, sc = self.method.loss(views, ctx)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"pre-training loss is {float(loss)} at step {self.current_step}; "
                                            f"lower --lr")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    self.method.after_step(ctx)
                    self.current_step += 1
                    steps_timed += 1
                    losses.append(float(loss.detach()))
                    for k, v in sc.items():
                        scalars.setdefault(k, []).append(float(v))
                    if self.current_step % self.iterations_per_epoch == 0:
                        break
                self._decide_budget(time.time() - t_start, steps_timed)
                self._end_epoch(epoch, t0, losses, scalars)
        finally:
            stream.close()

    def _decide_budget(self, elapsed: float, steps: int) -> None:
        if self._budget_decided or steps == 0:
            return
        per_step = elapsed / steps
        fit = int((self.budget_s * 0.95) / per_step) // self.iterations_per_epoch
        self.num_epochs = max(1, min(self.num_epochs, fit), math.ceil(self.current_step / self.iterations_per_epoch))
        self._budget_decided = True
        self.logger.print(f"budget: {self.num_epochs} epochs x {self.iterations_per_epoch} iterations "
                          f"(step {per_step * 1000:.0f} ms)")

    def _end_epoch(self, epoch: int, t0: float, losses: list[float], scalars: dict[str, list[float]]) -> None:
        dt = time.time() - t0
        h = self.history
        n = len(h["loss"])
        h["loss"].append(float(np.mean(losses)) if losses else float("nan"))
        h["lr"].append(self.lr_at(max(0, self.current_step - 1)))
        h["epoch_time"].append(dt)
        for k in scalars:
            h["scalars"].setdefault(k, [float("nan")] * n)
        for k, v in h["scalars"].items():
            v.append(float(np.mean(scalars[k])) if k in scalars else float("nan"))
        remaining = self.num_epochs - (epoch + 1)
        eta = np.mean(h["epoch_time"][-5:]) * remaining
        figures = " ".join(f"{k} {v[-1]:.4g}" for k, v in h["scalars"].items())
        self.logger.print(f"epoch {epoch + 1}/{self.num_epochs}: loss {h['loss'][-1]:.4f} {figures} "
                          f"lr {h['lr'][-1]:.3g} time {dt:.1f}s ETA {_fmt(eta)}")
        if "embedding_std" in scalars and h["scalars"]["embedding_std"][-1] < 1e-3:
            self.logger.print("warning: embedding_std near 0: the embeddings have collapsed")
        self.save("checkpoint_latest.pth")
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from autossl.utilities.file_io import atomic_path

        h = self.history
        x = list(range(1, len(h["loss"]) + 1))
        fig, axes = plt.subplots(3, 1, figsize=(10, 9))
        axes[0].plot(x, h["loss"], color="b", linewidth=2, label=f"{self.method_name} loss")
        axes[0].set_ylabel("loss")
        for k, v in h["scalars"].items():
            axes[1].plot(x, v, linewidth=2, label=k)
        axes[1].set_ylabel("health")
        axes[2].plot(x, h["lr"], color="k", linewidth=2, label="learning rate")
        ax3 = axes[2].twinx()
        ax3.plot(x, h["epoch_time"], color="r", ls="--", label="epoch time [s]")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend(loc="upper right")
        plt.tight_layout()
        with atomic_path(self.output_folder / "progress.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
