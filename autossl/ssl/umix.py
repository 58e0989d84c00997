"""UMIX (UCMT, Shen et al. IJCAI 2023): uncertainty-guided block swapping within each image.

The image is cut into a regular grid of blocks. Blocks are ranked by the mean of two
uncertainty maps (one per student). Within the same image, the k most uncertain blocks of map A
are replaced by the k most certain blocks of map B, and the k most uncertain blocks of map B by
the k most certain blocks of map A (the j-th most uncertain block receives the block ranked
L-k+j by certainty, as in the reference code). Targets are rearranged identically.

Sides not divisible by the grid: blocks are ``side // grid`` voxels; the remainder strip at the
far end of each axis is never moved. A grid larger than a side is reduced to that side.
"""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import torch

T = TypeVar("T", torch.Tensor, list, tuple, None)


def grid_layout(spatial_shape: Sequence[int], grid: int | Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks per axis, block size per axis) for ``spatial_shape``."""
    n = len(spatial_shape)
    g = (int(grid),) * n if isinstance(grid, (int, float)) else tuple(int(x) for x in grid)
    if len(g) != n:
        raise ValueError(f"umix: grid {grid} does not match {n} spatial axes {tuple(spatial_shape)}")
    if any(x < 1 for x in g):
        raise ValueError(f"umix: grid {grid} must be >= 1 per axis")
    g = tuple(min(gi, s) for gi, s in zip(g, spatial_shape))
    b = tuple(s // gi for s, gi in zip(spatial_shape, g))
    return g, b


def to_blocks(x: torch.Tensor, g: Sequence[int], b: Sequence[int]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, L, P): L = prod(g) blocks (row-major), P = prod(b) voxels each."""
    bsz, c = x.shape[:2]
    n = len(g)
    core = x[(slice(None), slice(None)) + tuple(slice(0, gi * bi) for gi, bi in zip(g, b))]
    shape = [bsz, c]
    for gi, bi in zip(g, b):
        shape += [gi, bi]
    v = core.reshape(shape)
    perm = [0, 1] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)]
    return v.permute(perm).reshape(bsz, c, math.prod(g), math.prod(b))


def from_blocks(blocks: torch.Tensor, like: torch.Tensor, g: Sequence[int], b: Sequence[int]) -> torch.Tensor:
    """Inverse of ``to_blocks``: a copy of ``like`` with its gridded region replaced by ``blocks``."""
    bsz, c = like.shape[:2]
    n = len(g)
    v = blocks.reshape([bsz, c, *g, *b])
    perm = [0, 1]
    for i in range(n):
        perm += [2 + i, 2 + n + i]
    core = v.permute(perm).reshape([bsz, c, *(gi * bi for gi, bi in zip(g, b))])
    out = like.clone()
    out[(slice(None), slice(None)) + tuple(slice(0, gi * bi) for gi, bi in zip(g, b))] = core
    return out


def _as_map(u: torch.Tensor, n_spatial: int) -> torch.Tensor:
    if u.ndim == n_spatial + 1:
        u = u[:, None]
    if u.ndim != n_spatial + 2 or u.shape[1] != 1:
        raise ValueError(f"umix: uncertainty map must be (B, 1, *spatial) or (B, *spatial), got {tuple(u.shape)}")
    return u


def umix_indices(uncertainty_a: torch.Tensor, uncertainty_b: torch.Tensor, grid: int | Sequence[int], k: int):
    """Maps (B, 1, *spatial) -> block indices (B, k) each: (uncertain_a, certain_b, uncertain_b,
    certain_a), flat row-major over the grid. ``uncertain_x[:, j]`` is x's (j+1)-th most uncertain
    block; ``certain_x[:, j]`` x's block ranked L-k+j by uncertainty (``certain_x[:, -1]`` the most
    certain)."""
    ua, ub = _as_map(uncertainty_a, uncertainty_a.ndim - 2), _as_map(uncertainty_b, uncertainty_b.ndim - 2)
    if ua.shape != ub.shape:
        raise ValueError(f"umix: uncertainty maps differ in shape: {tuple(ua.shape)} vs {tuple(ub.shape)}")
    g, b = grid_layout(ua.shape[2:], grid)
    n_blocks = math.prod(g)
    if k < 0 or 2 * k > n_blocks:
        raise ValueError(f"umix: k={k} needs 0 <= 2k <= number of blocks ({n_blocks} for grid {g})")
    ma = to_blocks(ua.float(), g, b).mean(-1)[:, 0]  # (B, L)
    mb = to_blocks(ub.float(), g, b).mean(-1)[:, 0]
    ia = torch.sort(ma, dim=1, descending=True, stable=True).indices
    ib = torch.sort(mb, dim=1, descending=True, stable=True).indices
    return ia[:, :k], ib[:, n_blocks - k:], ib[:, :k], ia[:, n_blocks - k:]


def _mix_one(x: torch.Tensor, g, b, idx) -> torch.Tensor:
    uncertain_a, certain_b, uncertain_b, certain_a = idx
    blocks = to_blocks(x, g, b)
    out = blocks.clone()
    bi = torch.arange(x.shape[0], device=x.device)[:, None]
    # sources read from the unmixed image (equal to the reference code's in-place writes when 2k <= L);
    # where the two uncertain sets share a block, student B's replacement is written last, as there
    out[bi, :, uncertain_a] = blocks[bi, :, certain_b]
    out[bi, :, uncertain_b] = blocks[bi, :, certain_a]
    return from_blocks(out, x, g, b)


def umix(images: torch.Tensor, targets: T, uncertainty_a: torch.Tensor, uncertainty_b: torch.Tensor,
         grid: int | Sequence[int] = 8, k: int = 2) -> tuple[torch.Tensor, T]:
    """Mix ``images`` (B, C, *spatial) and ``targets`` (a (B, Ct, *spatial) tensor, a list/tuple of
    such tensors at the same resolution, or None) by the UMIX rule; 2D and 3D."""
    n_spatial = images.ndim - 2
    if n_spatial not in (2, 3):
        raise ValueError(f"umix: images must be (B, C, X, Y[, Z]), got {tuple(images.shape)}")
    spatial = tuple(images.shape[2:])
    ua = _as_map(uncertainty_a, n_spatial)
    if tuple(ua.shape[2:]) != spatial or ua.shape[0] != images.shape[0]:
        raise ValueError(f"umix: uncertainty {tuple(ua.shape)} does not match images {tuple(images.shape)}")
    g, b = grid_layout(spatial, grid)
    idx = umix_indices(ua, _as_map(uncertainty_b, n_spatial), grid, k)
    mixed_images = _mix_one(images, g, b, idx)

    def mix_target(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[2:]) != spatial or t.shape[0] != images.shape[0]:
            raise ValueError(f"umix: target {tuple(t.shape)} does not match images {tuple(images.shape)}")
        return _mix_one(t, g, b, idx)

    if targets is None:
        return mixed_images, None
    if isinstance(targets, (list, tuple)):
        return mixed_images, type(targets)(mix_target(t) for t in targets)
    return mixed_images, mix_target(targets)
