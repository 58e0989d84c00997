"""Per-epoch training history, the text log and ``progress.png``.

One value per epoch for: train/val loss, pseudo-Dice per class, mean and EMA foreground
pseudo-Dice, epoch time, the learning rate of every optimiser and every scalar a method logs
(``ctx.log``; epochs where a scalar was not logged hold NaN). Only the main rank writes files.
"""
from __future__ import annotations

import math
import sys
from datetime import datetime
from pathlib import Path

from autossl.utilities.file_io import atomic_path

_FIXED = ("train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "epoch_time", "epoch_end_timestamp", "step")


class TrainingLogger:
    def __init__(self, log_file: str | Path | None = None, enabled: bool = True, echo: bool = True):
        self.log_file = Path(log_file) if log_file is not None else None
        self.enabled = enabled
        self.echo = echo
        self.history: dict = {k: [] for k in _FIXED}
        self.history["pseudo_dice"] = []     # per epoch: list per foreground class
        self.history["lr"] = {}              # optimiser name -> list
        self.history["scalars"] = {}         # method scalar name -> list

    # ----------------------------------------------------------------- text
    def print(self, *args, timestamp: bool = True, console: bool = True) -> None:
        if not self.enabled:
            return
        msg = " ".join(str(a) for a in args)
        if timestamp:
            msg = f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}: {msg}"
        if self.echo and console:
            print(msg, flush=True)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.log_file, "a") as f:
                    f.write(msg + "\n")
            except OSError as e:  # a full disk must not kill a long run
                print(f"could not write to {self.log_file}: {e}", file=sys.stderr)

    # ----------------------------------------------------------------- history
    @property
    def num_epochs(self) -> int:
        return len(self.history["train_loss"])

    def log_epoch(self, *, train_loss: float, val_loss: float, pseudo_dice: list[float], ema_fg_dice: float,
                  epoch_time: float, step: int, lrs: dict[str, float], scalars: dict[str, float],
                  end_timestamp: float) -> None:
        n = self.num_epochs
        h = self.history
        h["train_loss"].append(float(train_loss))
        h["val_loss"].append(float(val_loss))
        h["pseudo_dice"].append([float(d) for d in pseudo_dice])
        finite = [d for d in pseudo_dice if not math.isnan(d)]
        h["mean_fg_dice"].append(float(sum(finite) / len(finite)) if finite else float("nan"))
        h["ema_fg_dice"].append(float(ema_fg_dice))
        h["epoch_time"].append(float(epoch_time))
        h["epoch_end_timestamp"].append(float(end_timestamp))
        h["step"].append(int(step))
        for store, values in ((h["lr"], lrs), (h["scalars"], scalars)):
            for k in values:
                store.setdefault(k, [float("nan")] * n)
            for k in store:
                store[k].append(float(values.get(k, float("nan"))))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]

    # ----------------------------------------------------------------- plot
    def plot(self, path: str | Path, scalar_names: tuple[str, ...] | list[str] = ()) -> None:
        if not self.enabled or self.num_epochs == 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        x = list(range(self.num_epochs))
        order = [k for k in scalar_names if k in h["scalars"]] + sorted(k for k in h["scalars"] if k not in scalar_names)
        scalars = {k: h["scalars"][k] for k in order}  # every logged scalar, the declared ones first
        n_panels = 4 if scalars else 3
        fig, axes = plt.subplots(n_panels, 1, figsize=(12, 3.5 * n_panels))
        ax = axes[0]
        ax.plot(x, h["train_loss"], color="b", ls="-", label="loss_tr", linewidth=3)
        ax.plot(x, h["val_loss"], color="r", ls="-", label="loss_val", linewidth=3)
        ax2 = ax.twinx()
        ax2.plot(x, h["mean_fg_dice"], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, h["ema_fg_dice"], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=4)
        per_class = list(zip(*h["pseudo_dice"])) if h["pseudo_dice"] and h["pseudo_dice"][0] else []
        for i, series in enumerate(per_class):
            ax2.plot(x, series, ls="--", linewidth=1, alpha=0.7, label=f"pseudo dice class {i + 1}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))
        i = 1
        if scalars:
            ax = axes[i]
            for k, v in scalars.items():
                ax.plot(x, v, ls="-", label=k, linewidth=2)
            ax.set_xlabel("epoch")
            ax.set_ylabel("method scalars")
            ax.legend(loc=(0, 1), ncol=min(4, len(scalars)))
            i += 1
        ax = axes[i]
        ax.plot(x, h["epoch_time"], color="b", ls="-", label="epoch duration", linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc=(0, 1))
        ax = axes[i + 1]
        for k, v in h["lr"].items():
            ax.plot(x, v, ls="-", label=f"learning rate {k}", linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))
        plt.tight_layout()
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
