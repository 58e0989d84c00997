"""The transformer variant of a configuration: Primus (3D) / Primus2D (2D), sized to a memory budget.

Each configuration in the plans carries ``transformer_architecture`` in the same form as
``architecture`` (``network_class_name``, ``arch_kwargs``, ``_kw_requires_import``); the network
is built with ``autossl.networks.build.build_network`` which injects ``input_channels`` and
``num_classes``. Its input is the configuration's patch (``input_shape == patch_size``).

Patch embedding: 8 voxels per axis where the patch allows, otherwise ``gcd(patch axis, 8)``, so
every patch axis is divisible by the embedding by construction (no padding, no cropping; an axis
whose patch is not a multiple of 8, e.g. the few-slice axis of anisotropic data, gets a finer
embedding). Width/depth/heads come from Primus's presets; the largest one whose estimated
training memory fits the budget is used.
"""
from __future__ import annotations

import math
from typing import Sequence

PRIMUS_3D = "dynamic_network_architectures.architectures.primus.Primus"
PRIMUS_2D = "autossl.networks.transformer2d.Primus2D"

#: name -> (eva_depth, eva_numheads, embed_dim); S..L are Primus's presets (DNA ``_PRIMUS_CONFIGS``),
#: T and XT are smaller ones for CPU plans
PRESETS: dict[str, tuple[int, int, int]] = {
    "XT": (2, 2, 96),
    "T": (4, 4, 192),
    "S": (12, 6, 396),
    "B": (12, 12, 792),
    "M": (16, 12, 864),
    "L": (24, 16, 1056),
}
PRESET_ORDER = ("XT", "T", "S", "B", "M", "L")

#: nnU-Net's Primus trainers' settings (drop path 0.2, layer scale 0.1, scaled inner attention)
DEFAULT_TRANSFORMER_KWARGS = {
    "drop_path_rate": 0.2,
    "init_values": 0.1,
    "scale_attn_inner": True,
    "mlp_ratio": 4 * 2 / 3,
    "num_register_tokens": 0,
    "use_rot_pos_emb": True,
    "use_abs_pos_embed": True,
}


def patch_embed_size_for(patch_size: Sequence[int], max_embed: int = 8) -> list[int]:
    """Per axis ``gcd(patch, max_embed)``: the largest embedding <= max_embed that divides the patch axis."""
    return [math.gcd(int(p), int(max_embed)) for p in patch_size]


def embed_dim_for(dim: int, heads: int, embed_dim: int) -> int:
    """Round ``embed_dim`` down so that each head's width suits RoPE: a multiple of 6 in 3D
    (Primus's 3D RoPE uses head_dim / 1.5, a multiple of 4), a multiple of 4 in 2D."""
    step = heads * (6 if dim == 3 else 4)
    return max(step, (embed_dim // step) * step)


def estimate_training_bytes(n_tokens: int, batch_size: int, depth: int, embed_dim: int, mlp_ratio: float,
                            input_channels: int, patch_voxels: int) -> float:
    """Rough training memory of a ViT with mixed precision and fused attention.

    Weights + gradients + AdamW moments: 16 bytes per parameter. Activations: 34 bytes per token
    and channel per block (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models"; the attention matrix is not stored with fused attention), plus the
    full-resolution input/output of the patch embedding and decoder."""
    per_block_params = 4 * embed_dim ** 2 + 3 * embed_dim * int(mlp_ratio * embed_dim)
    params = depth * per_block_params + 2 * input_channels * patch_voxels * embed_dim
    activations = 34.0 * n_tokens * embed_dim * depth * batch_size
    io = 4.0 * batch_size * n_tokens * patch_voxels * 16
    return 16.0 * params + activations + io


def transformer_architecture(patch_size: Sequence[int], batch_size: int, input_channels: int,
                             memory_budget_gb: float, max_preset: str = "M", min_preset: str = "S",
                             max_patch_embed: int = 8) -> dict | None:
    """Plans entry for the transformer of one configuration (2D or 3D from ``len(patch_size)``).

    ``None`` when no patch axis is even: Primus' decoder needs a patch embedding >= 2 somewhere."""
    dim = len(patch_size)
    if dim not in (2, 3):
        raise ValueError(f"patch size {tuple(patch_size)}: only 2D and 3D configurations have a transformer")
    pe = patch_embed_size_for(patch_size, max_patch_embed)
    if max(pe) < 2:
        print(f"WARNING: patch size {list(patch_size)} has no even axis; this configuration gets no transformer "
              f"(transformer_architecture = null)")
        return None
    n_tokens = math.prod(int(p) // e for p, e in zip(patch_size, pe))
    patch_voxels = math.prod(pe)
    lo, hi = PRESET_ORDER.index(min_preset), PRESET_ORDER.index(max_preset)
    if lo > hi:
        raise ValueError(f"transformer presets: min {min_preset} is larger than max {max_preset}")
    chosen = PRESET_ORDER[lo]
    for name in PRESET_ORDER[lo:hi + 1]:
        depth, heads, width = PRESETS[name]
        width = embed_dim_for(dim, heads, width)
        need = estimate_training_bytes(n_tokens, batch_size, depth, width, DEFAULT_TRANSFORMER_KWARGS["mlp_ratio"],
                                       input_channels, patch_voxels)
        if need <= memory_budget_gb * 1e9:
            chosen = name
    depth, heads, width = PRESETS[chosen]
    kwargs = {
        "embed_dim": embed_dim_for(dim, heads, width),
        "patch_embed_size": pe,
        "eva_depth": depth,
        "eva_numheads": heads,
        "input_shape": [int(p) for p in patch_size],
        **DEFAULT_TRANSFORMER_KWARGS,
    }
    return {
        "network_class_name": PRIMUS_3D if dim == 3 else PRIMUS_2D,
        "arch_kwargs": kwargs,
        "_kw_requires_import": [],
        "preset": chosen,
    }


