"""Sliding-window prediction of one preprocessed case (nnU-Net v2's scheme).

* tiles of ``patch_size`` with a step of at most ``tile_step_size * patch`` (evenly spaced, so the
  last tile ends at the image border); images smaller than a patch are zero-padded first
  (``acvl_utils`` ``pad_nd_image``) and the padding is removed again at the end;
* every tile's logits are weighted with a Gaussian importance map (sigma = patch / 8, centre
  weight 1, zeros replaced by the smallest non-zero weight) and the sum is divided by the summed
  weights;
* test-time mirroring averages the logits of all 2^k flips over the allowed axes;
* several networks (an SSL method's inference networks) are combined per tile by averaging their
  probabilities (softmax, or sigmoid for regions); the average is handed on as log-probabilities
  (``log p`` resp. ``logit(p)``), so that the usual nonlinearity recovers it exactly. One network
  gives its plain logits, exactly as nnU-Net.

Unlike nnU-Net, which runs the 2^k mirrored tiles one by one, the flips of a tile (and several
tiles) go through the network as one batch: on the CPU a small network runs several times
faster per patch in a batch of 8 than one by one. Accumulators are float32 (nnU-Net uses fp16 with a x10 Gaussian,
which only saves memory on the GPU). The networks run under autocast: float16 on CUDA (as
nnU-Net) and, unlike nnU-Net, bfloat16 on CPUs that compute it natively (see ``autocast_dtype``).
"""
from __future__ import annotations

import itertools
import os
from contextlib import nullcontext
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm import tqdm

#: voxels per forward pass (batch x patch) the default batch size aims at. Small networks on the
#: CPU run several times faster per patch in batches (per-call overhead dominates), big patches
#: gain little and only cost memory; on CUDA memory, not overhead, is the limit
CPU_VOXELS_PER_BATCH = 2 ** 18
CUDA_VOXELS_PER_BATCH = 2 ** 22
MAX_BATCH = 32


def default_batch_size(patch_size: Sequence[int], device: torch.device | str) -> int:
    """Largest power of two with batch x patch voxels <= the device's budget (1 ... 32)."""
    budget = CUDA_VOXELS_PER_BATCH if torch.device(device).type == "cuda" else CPU_VOXELS_PER_BATCH
    n = max(1, budget // int(np.prod(patch_size)))
    return int(min(MAX_BATCH, 2 ** int(np.floor(np.log2(n)))))


@lru_cache(maxsize=8)
def _gaussian_np(tile_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g != 0].min()
    return g.astype(np.float32)


def compute_gaussian(tile_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 1.0,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian importance map of ``tile_size`` (peak ``value_scaling_factor``, no zeros)."""
    g = torch.from_numpy(_gaussian_np(tuple(int(i) for i in tile_size), float(sigma_scale)).copy())
    if value_scaling_factor != 1:
        g *= value_scaling_factor
    return g.to(device=device, dtype=dtype)


def compute_steps_for_sliding_window(image_size: Sequence[int], tile_size: Sequence[int],
                                     tile_step_size: float) -> list[list[int]]:
    """Start coordinates per axis: as few steps as allow a step <= tile*step_size, evenly spaced."""
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
    if any(i < t for i, t in zip(image_size, tile_size)):
        raise ValueError(f"image {tuple(image_size)} is smaller than the tile {tuple(tile_size)}; pad it first")
    steps = []
    for i, t in zip(image_size, tile_size):
        n = int(np.ceil((i - t) / (t * tile_step_size))) + 1
        max_start = i - t
        actual = max_start / (n - 1) if n > 1 else 0
        steps.append([int(np.round(actual * k)) for k in range(n)])
    return steps


def get_sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int],
                               tile_step_size: float) -> list[tuple]:
    """Slicers into the spatial part of the (padded) data, channel axis excluded.

    ``image_size`` is the spatial shape; when ``patch_size`` has one entry fewer (2D network on a
    3D array) every slice along the first axis is tiled separately and the slicer holds its index.
    """
    image_size = tuple(int(i) for i in image_size)
    patch_size = tuple(int(i) for i in patch_size)
    if len(patch_size) == len(image_size) - 1:
        steps = compute_steps_for_sliding_window(image_size[1:], patch_size, tile_step_size)
        return [(d, *[slice(s, s + p) for s, p in zip(starts, patch_size)])
                for d in range(image_size[0]) for starts in itertools.product(*steps)]
    if len(patch_size) != len(image_size):
        raise ValueError(f"patch {patch_size} does not fit an image of {len(image_size)} spatial axes")
    steps = compute_steps_for_sliding_window(image_size, patch_size, tile_step_size)
    return [tuple(slice(s, s + p) for s, p in zip(starts, patch_size)) for starts in itertools.product(*steps)]


def mirror_combinations(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """All flips over subsets of ``mirror_axes`` (spatial axis indices), the identity first."""
    axes = tuple(mirror_axes or ())
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16; read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(device: torch.device | str, use_amp: bool | None) -> torch.dtype | None:
    """The autocast dtype for inference on ``device`` (None: full float32).

    ``use_amp`` None means automatic: float16 on CUDA (as nnU-Net), bfloat16 on CPUs with native
    bf16 (AMX / AVX512-BF16: about 2.5x faster convolutions there; the environment variable
    ``autossl_cpu_amp=0`` turns it off), float32 elsewhere (emulated bf16 is slower than fp32).
    ``True`` forces autocast (bf16 on the CPU), ``False`` disables it."""
    device = torch.device(device)
    if use_amp is False:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        if use_amp is None:
            if os.environ.get("autossl_cpu_amp", "1").lower() in ("0", "false", "no", "off"):
                return None
            if not cpu_has_native_bf16():
                return None
        return torch.bfloat16
    return None


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    if isinstance(out, (list, tuple)):  # deep supervision left on: full resolution first
        out = out[0]
    return out


def _to_log_space(probs: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    p = probs.clamp(1e-7, 1 - 1e-7) if sigmoid else probs.clamp_min(1e-7)
    return torch.log(p) - torch.log1p(-p) if sigmoid else torch.log(p)


class SlidingWindowPredictor:
    """Predict the logits of one preprocessed case (c, *spatial) with one or more networks.

    networks:      modules in eval mode on ``device`` (the caller moves them)
    patch_size:    the configuration's patch size (2 or 3 entries)
    num_heads:     output channels (``LabelManager.num_segmentation_heads``)
    mirror_axes:   spatial axes allowed for mirroring (``None``/empty: no test-time mirroring)
    regions:       members are combined with sigmoid instead of softmax
    batch_size:    network inputs per forward pass (flips x tiles); default ``default_batch_size``
    use_amp:       autocast; None = automatic (see ``autocast_dtype``)
    """

    def __init__(self, networks: Sequence[nn.Module], patch_size: Sequence[int], num_heads: int, *,
                 tile_step_size: float = 0.5, use_gaussian: bool = True,
                 mirror_axes: Sequence[int] | None = None, regions: bool = False,
                 device: torch.device | str = "cpu", batch_size: int | None = None,
                 use_amp: bool | None = None, allow_tqdm: bool = False, verbose: bool = False):
        if not networks:
            raise ValueError("at least one network is needed for prediction")
        self.networks = list(networks)
        self.patch_size = tuple(int(i) for i in patch_size)
        self.num_heads = int(num_heads)
        self.tile_step_size = float(tile_step_size)
        self.use_gaussian = use_gaussian
        self.device = torch.device(device)
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else ()
        if self.mirror_axes and max(self.mirror_axes) >= len(self.patch_size):
            raise ValueError(f"mirror axes {self.mirror_axes} do not fit a {len(self.patch_size)}D patch")
        self.combos = mirror_combinations(self.mirror_axes)
        self.regions = regions
        self.batch_size = max(1, int(batch_size or default_batch_size(self.patch_size, self.device)))
        self.amp_dtype = autocast_dtype(self.device, use_amp)
        self.allow_tqdm = allow_tqdm
        self.verbose = verbose
        #: patches through a network so far (tiles x flips x networks): the work a caller may
        #: count, e.g. a training run's predictions of its unlabelled pool
        self.network_inputs = 0

    # ------------------------------------------------------------------ tiles
    def _predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles (b, c, *patch) on device -> combined logits (b, heads, *patch), float32."""
        ndim_sp = tiles.ndim - 2
        flips = [tuple(a + 2 for a in combo) for combo in self.combos]
        inputs = torch.cat([torch.flip(tiles, f) if f else tiles for f in flips]) if len(flips) > 1 else tiles
        b = tiles.shape[0]
        member_out = []
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        for net in self.networks:
            outs = []
            self.network_inputs += int(inputs.shape[0])
            with amp:
                for start in range(0, inputs.shape[0], self.batch_size):
                    outs.append(_forward(net, inputs[start:start + self.batch_size]).float())
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            if out.shape[1] != self.num_heads or tuple(out.shape[2:]) != tuple(tiles.shape[2:]):
                raise RuntimeError(f"network output {tuple(out.shape[1:])} does not match "
                                   f"{self.num_heads} heads x patch {tuple(tiles.shape[2:])}")
            acc = out[:b].clone() if len(flips) > 1 else out
            for k, f in enumerate(flips[1:], start=1):
                acc += torch.flip(out[k * b:(k + 1) * b], f)
            if len(flips) > 1:
                acc /= len(flips)
            member_out.append(acc)
            del out
        if len(member_out) == 1:
            return member_out[0]
        nonlin = torch.sigmoid if self.regions else (lambda t: torch.softmax(t, 1))
        probs = sum(nonlin(m) for m in member_out) / len(member_out)
        assert probs.ndim == ndim_sp + 2
        return _to_log_space(probs, self.regions)

    # ------------------------------------------------------------------ case
    @torch.inference_mode()
    def predict(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        """data (c, *spatial) -> logits (heads, *spatial), float32 on the CPU."""
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        if data.ndim != 4:
            raise ValueError(f"data must be (c, x, y, z) (2D data as (c, 1, x, y)), got {tuple(data.shape)}")
        data = data.float()
        results_device = self.device
        try:
            return self._predict(data, results_device)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            if self.verbose:
                print("out of device memory for the result arrays; keeping them on the CPU")
            torch.cuda.empty_cache()
            return self._predict(data, torch.device("cpu"))

    def _predict(self, data: torch.Tensor, results_device: torch.device) -> torch.Tensor:
        two_d = len(self.patch_size) == data.ndim - 2
        pad_to = ((1, *self.patch_size) if two_d else self.patch_size)
        padded, revert = pad_nd_image(data, pad_to, "constant", {"value": 0}, True, None)
        spatial = tuple(padded.shape[1:])
        slicers = get_sliding_window_slicers(spatial, self.patch_size, self.tile_step_size)
        if self.verbose:
            print(f"sliding window: image {tuple(data.shape)}, padded {spatial}, patch {self.patch_size}, "
                  f"{len(slicers)} tiles x {len(self.combos)} flips x {len(self.networks)} networks")
        padded = padded.to(self.device, non_blocking=True)
        logits = torch.zeros((self.num_heads, *spatial), dtype=torch.float32, device=results_device)
        weights = torch.zeros(spatial, dtype=torch.float32, device=results_device)
        gaussian = (compute_gaussian(self.patch_size, device=results_device) if self.use_gaussian
                    else torch.ones(self.patch_size, device=results_device))
        if two_d:  # insert a singleton axis so that a 2D tile adds into the 3D array
            gaussian_acc = gaussian[None]
        else:
            gaussian_acc = gaussian
        tiles_per_batch = max(1, self.batch_size // len(self.combos))
        with tqdm(total=len(slicers), disable=not self.allow_tqdm, leave=False, desc="tiles") as bar:
            for start in range(0, len(slicers), tiles_per_batch):
                group = slicers[start:start + tiles_per_batch]
                tiles = torch.stack([padded[(slice(None), *s)] for s in group])
                pred = self._predict_tiles(tiles).to(results_device)
                if self.use_gaussian:
                    pred *= gaussian
                for s, p in zip(group, pred):
                    sl = tuple(slice(d, d + 1) if isinstance(d, int) else d for d in s)
                    logits[(slice(None), *sl)] += p[:, None] if two_d else p
                    weights[sl] += gaussian_acc
                bar.update(len(group))
        logits /= weights
        logits = logits[(slice(None), *revert[1:])]
        return logits.cpu() if logits.device.type != "cpu" else logits


def predict_sliding_window(networks: Sequence[nn.Module] | nn.Module, data: torch.Tensor | np.ndarray,
                           patch_size: Sequence[int], num_heads: int, **kwargs) -> torch.Tensor:
    """Functional form of :class:`SlidingWindowPredictor`; returns logits (heads, *spatial)."""
    if isinstance(networks, nn.Module):
        networks = [networks]
    return SlidingWindowPredictor(networks, patch_size, num_heads, **kwargs).predict(data)
