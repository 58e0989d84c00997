"""The planned transformer (Primus / Primus2D) taken apart: patch embedding, token grid, EVA blocks.

Both Primus (DNA, 3D) and Primus2D have ``down_projection`` (a strided convolution: the patch
embedding), ``eva`` (position embeddings, ``blocks``, ``norm``), ``up_projection`` (the decoder)
and ``register_tokens`` (None or prefix tokens). Semiformer runs the blocks in groups between its
fusion modules, and the pre-training stage uses the encoder half (``TransformerEncoder``) without
the decoder; both go through these helpers so that the token order is the one Primus' own
``forward`` uses (``b c *grid -> b (grid) c``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

TRANSFORMER_PARTS = ("down_projection", "eva", "up_projection")


def check_transformer(net: nn.Module, where: str) -> None:
    missing = [p for p in TRANSFORMER_PARTS if not hasattr(net, p)]
    if missing:
        raise ValueError(f"{where}: {type(net).__name__} is not a Primus-style transformer (it lacks "
                         f"{', '.join(missing)}); the plans' transformer_architecture must be Primus or Primus2D")
    if getattr(net.eva, "patch_drop", None) is not None:
        raise ValueError(f"{where}: the transformer has patch dropout (patch_drop_rate > 0); set it to 0 in the "
                         f"plans' transformer_architecture")


def num_prefix_tokens(net: nn.Module) -> int:
    reg = getattr(net, "register_tokens", None)
    return 0 if reg is None else int(reg.shape[1])


def embed(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Patch embedding + register tokens + position embeddings: (tokens (B, P + N, D), the rotary
    embedding the blocks take (or None), the token grid)."""
    t = net.down_projection(x)
    grid = tuple(t.shape[2:])
    tokens = t.flatten(2).transpose(1, 2)
    reg = getattr(net, "register_tokens", None)
    if reg is not None:
        tokens = torch.cat([reg.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens, rope, keep = net.eva._pos_embed(tokens)
    if keep is not None:  # pragma: no cover - check_transformer refuses patch dropout
        raise RuntimeError("patch dropout is not supported here")
    return tokens, rope, grid


def run_blocks(net: nn.Module, tokens: torch.Tensor, rope, blocks) -> torch.Tensor:
    for blk in blocks:
        tokens = blk(tokens, rope=rope)
    return tokens


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, ...], prefix: int) -> torch.Tensor:
    """(B, P + N, D) -> (B, D, *grid), prefix (register) tokens dropped."""
    body = tokens[:, prefix:]
    return body.transpose(1, 2).reshape(body.shape[0], body.shape[2], *grid)


def map_to_tokens(token_map: torch.Tensor, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Put a (B, D, *grid) map back behind the prefix tokens of ``tokens``."""
    body = token_map.flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :prefix], body], dim=1) if prefix else body


class TransformerEncoder(nn.Module):
    """The planned transformer without its decoder: ``forward(x) -> (B, D, *grid)``, the normed
    output tokens on their grid. The submodules are the transformer's own (``down_projection``,
    ``eva``, ``register_tokens``), so ``state_dict`` keys are those of the full network and load
    into it unchanged. ``token_mask`` (B, N) bool: masked image modelling replaces those patch
    embeddings with the learned ``mask_token`` before the position embeddings (SimMIM)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        check_transformer(net, "TransformerEncoder")
        self.down_projection = net.down_projection
        self.eva = net.eva
        self.register_tokens = getattr(net, "register_tokens", None)
        self.embed_dim = int(net.eva.embed_dim)
        self.output_channels = [self.embed_dim]  # the interface PooledEncoder reads
        self.patch_embed_size = tuple(int(p) for p in net.down_projection.proj.kernel_size)
        self.input_channels = int(net.down_projection.proj.in_channels)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> torch.Tensor:
        if token_mask is None:
            tokens, rope, grid = embed(self, x)
        else:
            t = self.down_projection(x)
            grid = tuple(t.shape[2:])
            tokens = t.flatten(2).transpose(1, 2)
            m = token_mask[..., None].to(tokens.dtype)
            tokens = tokens * (1 - m) + mask_token.to(tokens.dtype) * m
            if self.register_tokens is not None:
                tokens = torch.cat([self.register_tokens.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            tokens, rope, _ = self.eva._pos_embed(tokens)
        tokens = self.eva.norm(run_blocks(self, tokens, rope, self.eva.blocks))
        return tokens_to_map(tokens, grid, num_prefix_tokens(self))
