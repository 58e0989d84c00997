"""Temporal ensembling (Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017)
for patch-based segmentation.

The paper keeps, for every training image i, an exponential moving average Z_i of the network's
past predictions, updated once per epoch, Z_i ← α·Z_i + (1 - α)·z_i (α = 0.6), and trains
against the start-up bias-corrected target z̃_i = Z_i / (1 - α^t) (t: updates so far; Z starts
at 0, so without the correction the early targets would be shrunk towards 0):

    L = L_s(labelled) + w(t) · mean over unlabelled voxels and classes of (softmax f(x_u + n) - z̃)²

The network sees its own stochastic perturbation (input noise n = clamp(N(0, 0.1²), -0.2, 0.2)
and the encoder dropout of ``NetworkSpec.dropout``); the target carries no gradient.

**Where the ensemble lives (design).** A segmentation network trains on random, spatially
augmented crops, and the unlabelled batch carries no crop location (``loaders.py`` hands over
``data`` and ``keys`` only, after rotation, scaling and mirroring), so predictions made on a
training crop cannot be written back to their place in the case. The ensemble is therefore kept
per case, per voxel, at the resolution of the preprocessed case (``resolution=half``: every
second voxel per axis, the slice axis of a 2D run excepted), and updated from whole-case
predictions: every ``update_every`` of the semi-supervised phase (first at its first step) the
real sliding-window predictor (``ctx.predict_unlabeled``, eval mode, one pass per tile) predicts
every unlabelled case and Z is updated for every voxel, so "one update" plays the role of the paper's
epoch, and t counts them per case. After each update the bias-corrected targets are handed to
the unlabelled loader (``ctx.set_pseudo_labels``), which crops and augments them with exactly the
same crop, rotation, scaling and mirroring as the image (the ignore label -1 pads outside the
case): the target is aligned with the training crop whatever the augmentation did, with no change
to the loader. Between updates the targets stay fixed, as in the paper, where they change once
per epoch. The paper's z_i is the network's own output, so the update does not average
mirrored passes (``mirror=true`` does, at 2^axes times the cost: 4 passes per tile in 2D, 8 in
3D; with them the pool prediction was 80 % of an A2D-3 run's semi-supervised phase).

The loader carries int16 label maps, resampled as labels (one value per voxel, never blended),
so the soft target travels as a code per voxel: its arg-max class k and the arg-max
probability q quantised to ``levels`` values between 1/C and 1, code = k·levels + level. The
decoded target is q for class k and (1 - q)/(C - 1) for every other class: exact (up to the
quantisation step (1 - 1/C)/(levels - 1)) for two classes; with more classes the mass not on
the arg-max is spread evenly. The loader's label resampling costs one interpolation per code
present in a crop, which is why the default stays at 16 levels.

Memory: Z is C bytes per stored voxel (``store=uint8``, probabilities ×255; ``float16``: 2C
bytes); Hippocampus (260 cases of about 36×50×35 voxels, C = 3) ≈ 49 MB full resolution,
6 MB at half resolution (3d_fullres); ACDC (200 volumes of about 10×256×216, C = 4) ≈ 442 MB full,
111 MB at half in-plane resolution (documentation/ssl_methods.md). The checkpoint holds Z
zlib-compressed (``state_dict``: bytes per case, plus the update counts; tensors and plain data
only), so ``--c`` continues with the same ensemble and hands its targets to the loader again at
the first resumed step. The whole-pool prediction at each update is not in ``relative_cost``
(as self-training's), which knows neither the pool nor its tiles: the trainer counts the
patches those predictions put through the network (``Trainer.pool_prediction``, in debug.json),
and the benchmark adds them to the arithmetic ratio.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from autossl.ssl.base import NetworkSpec, SSLMethod
from autossl.ssl.context import TrainingContext, main_output, main_target
from autossl.ssl.methods._shared import (check_choice, has_unlabeled, input_noise, ramp_weight, rampup_option,
                                         require_label_maps, split_output)
from autossl.ssl.methods.pi_model import check_dropout, check_noise
from autossl.ssl.registry import register

IGNORE = -1
_INT16_MAX = 32767


# ----------------------------------------------------------------------------- soft targets as int16 codes
def encode_targets(probs: torch.Tensor, levels: int) -> torch.Tensor:
    """Probabilities (C, *spatial) -> codes (1, *spatial) int16: arg-max class k and its
    probability q quantised to ``levels`` steps on [1/C, 1]: code = k·levels + round((q - 1/C) /
    (1 - 1/C) · (levels - 1))."""
    c = probs.shape[0]
    if c < 2:
        raise ValueError(f"temporal ensembling needs at least 2 classes, got {c}")
    if c * levels > _INT16_MAX + 1:
        raise ValueError(f"temporal ensembling: {c} classes × {levels} levels do not fit an int16 label map; "
                         f"lower levels to at most {(_INT16_MAX + 1) // c}")
    q, k = probs.float().max(0, keepdim=True)
    lo = 1.0 / c
    level = torch.round((q - lo) / (1 - lo) * (levels - 1)).clamp(0, levels - 1).long()
    return (k * levels + level).to(torch.int16)


def decode_targets(codes: torch.Tensor, num_classes: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (B, 1, *spatial) -> (soft target (B, C, *spatial) float32, valid (B, 1, *spatial) bool);
    -1 (outside the case, or no target yet) is invalid."""
    valid = codes >= 0
    c = codes.long().clamp_min(0)
    k, level = c // levels, c % levels
    if bool((k >= num_classes).any()):
        raise ValueError(f"temporal ensembling: target codes up to {int(c.max())} do not fit {num_classes} classes × "
                         f"{levels} levels (were they written with other options?)")
    lo = 1.0 / num_classes
    q = lo + (1 - lo) * level.float() / (levels - 1)
    rest = (1 - q) / (num_classes - 1)
    onehot = F.one_hot(k[:, 0], num_classes).movedim(-1, 1).float()
    return rest + onehot * (q - rest), valid


# ----------------------------------------------------------------------------- the ensemble
class TemporalEnsemble:
    """Per-case EMA Z of predictions (C, *spatial), stored compressed on the CPU.

    ``update(case, probs)``: Z ← α·Z + (1 - α)·probs (Z = 0 before the first update), t += 1;
    ``target(case)``: z̃ = Z / (1 - α^t) at the case's resolution. ``factors``: per-axis
    subsampling of the stored Z (1 = full resolution, 2 = half; area-averaged down, linear up).
    ``store``: "uint8" (probabilities ×255, rounded) or "float16"."""

    def __init__(self, alpha: float = 0.6, store: str = "uint8", factors: tuple[int, ...] | None = None):
        if not 0 <= alpha < 1:
            raise ValueError(f"temporal ensembling: alpha must be in [0, 1), got {alpha}")
        if store not in ("uint8", "float16"):
            raise ValueError(f"temporal ensembling: store must be uint8 or float16, got {store!r}")
        self.alpha = float(alpha)
        self.store = store
        self.factors = None if factors is None else tuple(int(f) for f in factors)
        self.z: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self._packed: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.z)

    def __contains__(self, case: str) -> bool:
        return case in self.z

    def nbytes(self) -> int:
        return sum(z.numel() * z.element_size() for z in self.z.values())

    def _stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        f = self.factors or (1,) * len(shape)
        if len(f) != len(shape):
            raise ValueError(f"temporal ensembling: {len(f)} subsampling factors for a {len(shape)}D case")
        return tuple(-(-s // fi) for s, fi in zip(shape, f))

    def _resample(self, x: torch.Tensor, size: tuple[int, ...], down: bool) -> torch.Tensor:
        if tuple(x.shape[1:]) == tuple(size):
            return x
        mode = "area" if down else ("bilinear" if x.ndim == 3 else "trilinear" if x.ndim == 4 else "linear")
        kw = {} if down else {"align_corners": False}
        return F.interpolate(x[None], size=size, mode=mode, **kw)[0]

    def _encode(self, z: torch.Tensor) -> torch.Tensor:
        if self.store == "uint8":
            return torch.round(z.clamp(0, 1) * 255).to(torch.uint8)
        return z.to(torch.float16)

    def _decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float() / 255 if stored.dtype == torch.uint8 else stored.float()

    def update(self, case: str, probs) -> None:
        p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).detach().float().cpu()
        shape = tuple(p.shape[1:])
        if case in self.z and (self.shape[case] != shape or self.z[case].shape[0] != p.shape[0]):
            raise ValueError(f"temporal ensembling: case {case} was {self.shape[case]} with "
                             f"{self.z[case].shape[0]} classes, now {shape} with {p.shape[0]}")
        small = self._resample(p, self._stored_shape(shape), down=True)
        old = self._decode(self.z[case]) if case in self.z else torch.zeros_like(small)
        self.z[case] = self._encode(self.alpha * old + (1 - self.alpha) * small)
        self.count[case] = self.count.get(case, 0) + 1
        self.shape[case] = shape
        self._packed.pop(case, None)

    def target(self, case: str) -> torch.Tensor:
        """Bias-corrected z̃ = Z / (1 - α^t), (C, *case spatial) float32."""
        z = self._decode(self.z[case]) / (1 - self.alpha ** self.count[case])
        return self._resample(z, self.shape[case], down=False).clamp(0, 1)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        for case, z in self.z.items():
            if case not in self._packed:
                self._packed[case] = {"dtype": self.store, "stored_shape": list(z.shape),
                                      "shape": list(self.shape[case]), "count": int(self.count[case]),
                                      "data": zlib.compress(z.contiguous().numpy().tobytes(), 1)}
        return {"alpha": self.alpha, "store": self.store,
                "factors": None if self.factors is None else list(self.factors),
                "cases": {c: dict(self._packed[c]) for c in self.z}}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state.get("alpha", self.alpha))
        self.store = state.get("store", self.store)
        f = state.get("factors")
        self.factors = None if f is None else tuple(int(x) for x in f)
        self.z, self.count, self.shape, self._packed = {}, {}, {}, {}
        for case, p in (state.get("cases") or {}).items():
            dtype = np.uint8 if p["dtype"] == "uint8" else np.float16
            arr = np.frombuffer(zlib.decompress(p["data"]), dtype=dtype).reshape(p["stored_shape"]).copy()
            self.z[case] = torch.from_numpy(arr)
            self.count[case] = int(p["count"])
            self.shape[case] = tuple(int(s) for s in p["shape"])
            self._packed[case] = dict(p)


class EncodedTargets(Mapping):
    """{case: int16 codes (1, *spatial)} computed one case at a time from the ensemble, for
    ``ctx.set_pseudo_labels`` (never all cases decoded at once)."""

    def __init__(self, ensemble: TemporalEnsemble, levels: int):
        self.ensemble = ensemble
        self.levels = levels

    def __getitem__(self, case: str) -> np.ndarray:
        return encode_targets(self.ensemble.target(case), self.levels).numpy()

    def __iter__(self):
        return iter(self.ensemble.z)

    def __len__(self) -> int:
        return len(self.ensemble)


@register("temporal_ensembling")
class TemporalEnsembling(SSLMethod):
    """Options: lambda (0.1), rampup (1.0 from scratch, 0.1 after a warm start), alpha (0.6),
    update_every (0.1: share of the semi-supervised phase between ensemble updates; >= 1: steps),
    resolution (full|half), store (uint8|float16), levels (16: quantisation of the handed-over
    target), noise_std (0.1), noise_clip (0.2), dropout (0.2), chunk (4: cases per predictor call),
    mirror (false: average mirrored passes in the ensemble's predictions)."""

    scalars = ("loss_sup", "loss_unsup", "ramp_weight", "target_share", "ensemble_updates", "pl_confidence")
    default_unlabeled_ratio = 1.0

    def __init__(self, **options):
        super().__init__(**options)
        self.lambda_max = self.option("lambda", 0.1)
        if self.lambda_max < 0:
            raise ValueError(f"--ssl {self.name}: lambda must be >= 0, got {self.lambda_max}")
        self.rampup = rampup_option(self, cold=1.0)
        self.alpha = self.option("alpha", 0.6)
        if not 0 <= self.alpha < 1:
            raise ValueError(f"--ssl {self.name}: alpha must be in [0, 1), got {self.alpha}")
        self.update_every = self.option("update_every", 0.1)
        if not self.update_every > 0:
            raise ValueError(f"--ssl {self.name}: update_every must be > 0 (a share of the semi-supervised phase "
                             f"below 1, steps from 1), got {self.update_every}")
        self.resolution = check_choice(self.name, "resolution", self.option("resolution", "full"), ("full", "half"))
        self.store = check_choice(self.name, "store", self.option("store", "uint8"), ("uint8", "float16"))
        self.levels = self.option("levels", 16)
        if not 2 <= self.levels <= _INT16_MAX // 2:
            raise ValueError(f"--ssl {self.name}: levels must be in [2, {_INT16_MAX // 2}], got {self.levels}")
        self.noise_std, self.noise_clip = check_noise(self, self.option("noise_std", 0.1),
                                                      self.option("noise_clip", 0.2))
        self.dropout = check_dropout(self, self.option("dropout", 0.2))
        self.chunk = self.option("chunk", 4)
        if self.chunk < 1:
            raise ValueError(f"--ssl {self.name}: chunk must be >= 1, got {self.chunk}")
        self.mirror = self.option("mirror", False)
        self.ensemble = TemporalEnsemble(self.alpha, self.store)
        self.updates = 0
        self._handed_over = False

    def network_specs(self) -> list[NetworkSpec]:
        return [NetworkSpec("student", dropout=self.dropout)]

    def relative_cost(self, r: float) -> float:
        """Forward + backward over B + rB; the ensemble updates (a sliding-window prediction of
        the unlabelled pool every ``update_every``) are counted by the trainer
        (``Trainer.pool_prediction``), not here."""
        return 1 + r

    # ------------------------------------------------------------------ ensemble updates
    def interval(self, ctx: TrainingContext) -> int:
        """Steps between two updates of the ensemble."""
        if self.update_every >= 1:
            return int(self.update_every)
        return max(1, int(round(self.update_every * ctx.ssl_total_steps)))

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        """Subsampling of the stored ensemble per axis of the preprocessed (3D) case: none at
        full resolution; at half resolution every axis, but the slice axis of a 2D run."""
        if self.resolution == "full":
            return (1, 1, 1)
        return (1, 2, 2) if spatial_dims == 2 else (2, 2, 2)

    def update_ensemble(self, ctx: TrainingContext, spatial_dims: int) -> None:
        """Predict every unlabelled case, update Z and hand the bias-corrected targets over."""
        if ctx.predict_unlabeled is None or ctx.set_pseudo_labels is None:
            raise RuntimeError(f"--ssl {self.name} needs a trainer that provides ctx.predict_unlabeled and "
                               f"ctx.set_pseudo_labels")
        cases = list(ctx.unlabeled_cases)
        if not cases:
            raise RuntimeError(f"--ssl {self.name}: the dataset has no preprocessed unlabelled cases")
        if self.ensemble.factors is None:
            self.ensemble.factors = self.factors(spatial_dims)
        conf = []
        for i in range(0, len(cases), self.chunk):
            for case, probs in ctx.predict_unlabeled(cases[i:i + self.chunk], mirroring=self.mirror).items():
                if probs.shape[0] != ctx.num_classes:
                    raise RuntimeError(f"--ssl {self.name}: prediction of {case} has {probs.shape[0]} channels, "
                                       f"not the {ctx.num_classes} classes")
                self.ensemble.update(case, probs)
                conf.append(float(np.asarray(probs).max(0).mean()))
        self.updates += 1
        ctx.log("pl_confidence", float(np.mean(conf)))
        self.hand_over(ctx)

    def hand_over(self, ctx: TrainingContext) -> None:
        ctx.set_pseudo_labels(EncodedTargets(self.ensemble, self.levels))
        self._handed_over = True

    def training_step(self, labeled: dict, unlabeled: dict | None, ctx: TrainingContext) -> Iterator[torch.Tensor]:
        require_label_maps(labeled["target"], self.name)
        x_l = labeled["data"]
        n_l = x_l.shape[0]
        use_u = has_unlabeled(unlabeled)
        if use_u:
            if ctx.ssl_step >= self.updates * self.interval(ctx):
                self.update_ensemble(ctx, x_l.ndim - 2)
            elif not self._handed_over and len(self.ensemble):
                self.hand_over(ctx)  # resumed (--c): the checkpoint's ensemble, the same targets as before
        net = ctx.networks["student"]
        x = torch.cat([x_l, unlabeled["data"] + input_noise(unlabeled["data"], ctx, self.noise_std, self.noise_clip)]) \
            if use_u else x_l
        with ctx.autocast():
            out_l, out_u = split_output(net(x), n_l)
        loss_sup = ctx.supervised_loss(out_l, labeled["target"])
        loss_unsup = loss_sup.new_zeros(())
        share = 0.0
        if use_u and unlabeled.get("target") is not None:
            target, valid = decode_targets(main_target(unlabeled["target"]), ctx.num_classes, self.levels)
            p = torch.softmax(main_output(out_u).float(), 1)
            n_valid = valid.sum()
            loss_unsup = (((p - target) ** 2) * valid).sum() / (ctx.num_classes * n_valid.clamp_min(1))
            share = valid.float().mean()
        weight = ramp_weight(self.lambda_max, self.rampup, ctx)
        ctx.log("loss_sup", loss_sup)
        ctx.log("loss_unsup", loss_unsup)
        ctx.log("ramp_weight", weight)
        ctx.log("target_share", share)
        ctx.log("ensemble_updates", self.updates)
        yield loss_sup + weight * loss_unsup

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"updates": self.updates, "ensemble": self.ensemble.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        if "ensemble" in state:
            self.ensemble.load_state_dict(state["ensemble"])
        self._handed_over = False
