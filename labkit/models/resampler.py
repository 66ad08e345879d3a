"""The Qwen-VL-style resampler: learned queries cross-attend to a set of tokens.

SEED-Story uses one class (`src/models/qwen_visual.py::Resampler`) three times (paper §3.1-3.2):
- the visual tokenizer's `attn_pool`: 256 queries over the ViT's 1024 patches -> 256×4096 features;
- the MLLM's `input_resampler`: 64 queries over those 256 features -> the 64 image slots of the LLM;
- the MLLM's `output_resampler`: 256 queries over the 64 slots' hidden states -> 256×4096 regressed features.

It is a single `nn.MultiheadAttention` with LayerNorms on queries and keys/values, fixed 2D sin-cos position
embeddings (queries on their own grid, keys on the table interpolated to the key grid), a Linear from the key
width to the embedding width when they differ, and no FFN or output projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table [grid*grid, embed_dim] (MAE / Qwen-VL `get_2d_sincos_pos_embed`)."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2D sin-cos positions, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(ys), encode(xs)], dim=1).float()


def resize_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """Bicubically resize a square position table to `tokens` positions (Qwen-VL `get_abs_pos`)."""
    source = int(math.isqrt(table.shape[0]))
    target = int(math.isqrt(tokens))
    if source == target:
        return table
    if target * target != tokens:
        raise ValueError(f"{tokens} key tokens do not form a square grid")
    grid = table.reshape(1, source, source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(tokens, -1).to(table.dtype)


class Resampler(nn.Module):
    """`num_queries` (a square number) learned queries of width `embed_dim` attending to `kv_dim`-wide tokens."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        grid = int(math.isqrt(num_queries))
        if grid * grid != num_queries:
            raise ValueError(f"num_queries must be a square number (a grid of queries), got {num_queries}")
        self.num_queries, self.embed_dim = num_queries, embed_dim
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid), persistent=False)
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        kv_dim = kv_dim or embed_dim
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, kv_dim] -> [B, num_queries, embed_dim]. T must be a square for the key positions."""
        keys = self.ln_kv(self.kv_proj(tokens))
        positions = resize_positions(self.pos_embed, keys.shape[1]).to(keys.dtype)
        queries = (self.ln_q(self.query) + self.pos_embed.to(keys.dtype)).unsqueeze(0).expand(keys.shape[0], -1, -1)
        out, _ = self.attn(queries, keys + positions, keys, need_weights=False)
        return out
