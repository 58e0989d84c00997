"""Strong, geometry-preserving intensity augmentation (RandAugment-like) for FixMatch-style methods.

``StrongIntensityAugment`` works on a batch tensor ``(B, C, *spatial)`` (2D or 3D, CPU or GPU)
and returns a tensor of the same shape: per sample it applies ``n_ops`` operations drawn at
random from ``ops``, each with a random magnitude in ``[0, magnitude]`` (RandAugment with
random magnitudes, as FixMatch uses it), plus optional CutOut. No operation moves a voxel, so a
pseudo-label computed on the input stays aligned with the output.

Intensities are the preprocessed (normalised) values; every operation is scaled by the
sample's own per-channel statistics so that it behaves the same for z-scored MRI and CT.
Randomness comes from one ``torch.Generator`` (the call's ``generator`` or the object's own,
seeded with ``seed``): the same generator state gives the same output on any device.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

OPS: tuple[str, ...] = ("brightness", "contrast", "gamma", "noise", "blur", "sharpness", "posterize")


# ----------------------------------------------------------------------------- random helpers
def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen).item())


def device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen`` (tensors drawn where they are used)."""
    if torch.device(device).type == gen.device.type:
        return gen
    seed = int(torch.randint(0, 2 ** 62, (), generator=gen, device=gen.device).item())
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, std, min, max of ``x`` (C, *spatial), shaped to broadcast."""
    flat = x.flatten(1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return (flat.mean(1).view(shape), flat.std(1, unbiased=False).clamp_min(1e-6).view(shape),
            flat.amin(1).view(shape), flat.amax(1).view(shape))


# ----------------------------------------------------------------------------- filters
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` (C, *spatial) along every spatial axis (replicate border)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x.unsqueeze(0)  # (1, C, *spatial)
    nd = x.ndim - 1
    c = x.shape[0]
    for axis in range(nd):
        size = out.shape[2 + axis]
        r = min(radius, size - 1)
        k = kernel[radius - r: radius + r + 1]
        moved = out.movedim(2 + axis, -1)
        lead = moved.shape[:-1]
        line = moved.reshape(-1, 1, size)
        if r > 0:
            line = F.conv1d(F.pad(line, (r, r), mode="replicate"), k.view(1, 1, -1))
        out = line.reshape(*lead, size).movedim(-1, 2 + axis)
    return out.reshape(c, *x.shape[1:])


# ----------------------------------------------------------------------------- operations
# each: (x (C, *spatial) float32, magnitude in [0, 1], cpu generator, device generator) -> x'
def _brightness(x, m, g, gd):
    _, std, _, _ = _stats(x)
    return x + _uniform(g, -0.5, 0.5) * m * std


def _contrast(x, m, g, gd):
    mean, _, _, _ = _stats(x)
    factor = 1.0 + _uniform(g, -0.5, 0.5) * m
    return (x - mean) * factor + mean


def _gamma(x, m, g, gd):
    _, _, lo, hi = _stats(x)
    rng = (hi - lo).clamp_min(1e-6)
    gamma = math.exp(_uniform(g, -1.0, 1.0) * m * math.log(2.0))  # [0.5, 2] at full magnitude
    return ((x - lo) / rng).clamp(0, 1) ** gamma * rng + lo


def _noise(x, m, g, gd):
    _, std, _, _ = _stats(x)
    sigma = _uniform(g, 0.0, 0.25) * m
    return x + torch.randn(x.shape, generator=gd, device=x.device, dtype=x.dtype) * std * sigma


def _blur(x, m, g, gd):
    return gaussian_blur(x, 0.5 + _uniform(g) * m)


def _sharpness(x, m, g, gd):
    amount = _uniform(g, 0.0, 1.5) * m
    return x + amount * (x - gaussian_blur(x, 1.0))


def _posterize(x, m, g, gd):
    _, _, lo, hi = _stats(x)
    rng = (hi - lo).clamp_min(1e-6)
    bits = 8 - int(round(_uniform(g) * m * 5))  # 8 (no-op) .. 3 bits
    levels = 2 ** bits
    q = torch.floor(((x - lo) / rng).clamp(0, 1) * (levels - 1) + 0.5) / (levels - 1)
    return q * rng + lo


_OP_FUNCS: dict[str, Callable] = {
    "brightness": _brightness, "contrast": _contrast, "gamma": _gamma, "noise": _noise,
    "blur": _blur, "sharpness": _sharpness, "posterize": _posterize,
}


# ----------------------------------------------------------------------------- boxes / CutOut
def random_box(spatial_shape: Sequence[int], fraction: tuple[float, float], gen: torch.Generator) -> tuple[slice, ...]:
    """A random axis-aligned box inside ``spatial_shape`` covering a share of the volume drawn
    from ``fraction`` (lo, hi), with a random aspect ratio (each side within 2x of the cube's)."""
    nd = len(spatial_shape)
    v = _uniform(gen, *fraction)
    logs = [_uniform(gen, -0.5, 0.5) * math.log(2.0) for _ in range(nd)]
    mean_log = sum(logs) / nd
    slices = []
    for s, e in zip(spatial_shape, logs):
        side = min(1.0, v ** (1.0 / nd) * math.exp(e - mean_log))
        size = max(1, min(s, int(round(side * s))))
        start = int(torch.randint(0, s - size + 1, (), generator=gen).item())
        slices.append(slice(start, start + size))
    return tuple(slices)


def box_mask(batch: int, spatial_shape: Sequence[int], fraction: tuple[float, float], gen: torch.Generator,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, *spatial) float mask, 1 inside one random box per sample (CutOut / CutMix)."""
    mask = torch.zeros((batch, 1, *spatial_shape), device=device)
    for b in range(batch):
        mask[(b, 0) + random_box(spatial_shape, fraction, gen)] = 1.0
    return mask


def cutmix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a`` outside and ``b`` inside the box mask M (B, 1, *spatial): a·(1 - M) + b·M for
    images (and soft maps), the same selection for integer labels."""
    if a.dtype.is_floating_point:
        m = mask.to(a.dtype)
        return a * (1 - m) + b * m
    return torch.where(mask.bool(), b, a)


def cutout(x: torch.Tensor, gen: torch.Generator, fraction: tuple[float, float] = (0.05, 0.25),
           p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase one random box per sample (with probability ``p``) with the sample's per-channel
    mean. Returns the new batch and the (B, 1, *spatial) mask of erased voxels."""
    b = x.shape[0]
    mask = torch.zeros((b, 1, *x.shape[2:]), device=x.device)
    for i in range(b):
        if _uniform(gen) < p:
            mask[(i, 0) + random_box(x.shape[2:], fraction, gen)] = 1.0
    mean = x.flatten(2).float().mean(2).view(b, x.shape[1], *([1] * (x.ndim - 2))).to(x.dtype)
    return torch.where(mask.bool(), mean.expand_as(x), x), mask


# ----------------------------------------------------------------------------- the transform
class StrongIntensityAugment:
    """RandAugment-like, geometry-preserving intensity augmentation of a batch (B, C, *spatial).

    p:            probability that a sample is augmented at all
    n_ops:        operations per augmented sample (drawn without replacement from ``ops``)
    magnitude:    upper bound of the random magnitude in [0, 1] (1 = the strongest listed ranges)
    ops:          names from ``OPS`` (brightness, contrast, gamma, noise, blur, sharpness, posterize)
    cutout_p:     probability of one CutOut box per sample (0 = off)
    cutout_fraction: share of the patch a CutOut box covers (lo, hi)
    seed:         seeds the object's own generator (used when a call passes none)
    """

    def __init__(self, p: float = 1.0, n_ops: int = 2, magnitude: float = 1.0, ops: Sequence[str] | None = None,
                 cutout_p: float = 0.0, cutout_fraction: tuple[float, float] = (0.05, 0.25), seed: int | None = None):
        self.ops = tuple(ops) if ops is not None else OPS
        unknown = [o for o in self.ops if o not in _OP_FUNCS]
        if unknown:
            raise ValueError(f"StrongIntensityAugment: unknown operation(s) {unknown}; known: {', '.join(OPS)}")
        if not 0 <= p <= 1 or not 0 <= cutout_p <= 1:
            raise ValueError(f"StrongIntensityAugment: probabilities must be in [0, 1], got p={p}, cutout_p={cutout_p}")
        if not 0 < n_ops <= len(self.ops):
            raise ValueError(f"StrongIntensityAugment: n_ops={n_ops} must be in 1..{len(self.ops)}")
        self.p, self.n_ops, self.magnitude = float(p), int(n_ops), float(magnitude)
        self.cutout_p, self.cutout_fraction = float(cutout_p), tuple(cutout_fraction)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"StrongIntensityAugment expects (B, C, *spatial), got shape {tuple(x.shape)}")
        g = generator if generator is not None else self.generator
        if g.device.type != "cpu":  # scalars are drawn on the CPU; tensors on x's device
            cpu = torch.Generator()
            cpu.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=g, device=g.device).item()))
            g = cpu
        gd = device_generator(g, x.device)
        out = []
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 even inside AMP
            for b in range(x.shape[0]):
                sample = x[b].float()
                if _uniform(g) < self.p:
                    order = torch.randperm(len(self.ops), generator=g)[: self.n_ops].tolist()
                    for k in order:
                        sample = _OP_FUNCS[self.ops[k]](sample, _uniform(g) * self.magnitude, g, gd)
                out.append(sample)
        y = torch.stack(out).to(x.dtype)
        if self.cutout_p > 0:
            y, _ = cutout(y, g, self.cutout_fraction, self.cutout_p)
        return y
