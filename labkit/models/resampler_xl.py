"""The de-tokenizer's Perceiver resampler (the official `ResamplerXLV2`, `src/models_ipa/resampler.py`).

It turns N x D visual features into what SDXL's UNet expects from its two text encoders:
- a token sequence [B, Q, w1 + w2]: learned latents that attend to [features; latents] for `depth` layers, then
  two projections concatenated (SDXL: CLIP-L 768 + OpenCLIP-bigG 1280 = 2048);
- a pooled vector [B, w2]: an attention pool over the latents (CLIP's `AttentionPool2d`: prepend the mean
  token, attend from it, project to w2), standing in for bigG's pooled text embedding.

Parameter names follow the official module (`norm1`/`norm2`/`to_q`/`to_kv`/`to_out`, `unet_proj_1`/`_2`,
`unet_attnpool.{q,k,v,c}_proj`) so that the released de-tokenizer's resampler weights load by name.

Quirk kept from the official code: the input is `F.normalize(x)` with the default `dim=1`, i.e. each channel is
L2-normalised over the *token* axis, not each token over its channels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to the features and to themselves (keys/values from [x; latents])."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # features, latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm1(media), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )


class AttentionPool(nn.Module):
    """CLIP's attention pool over a token sequence: the mean token attends to [mean; tokens] -> one vector."""

    def __init__(self, tokens: int, width: int, heads: int, out_width: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, width) / width**0.5)
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )
        self.c_proj = nn.Linear(width, out_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding
        q, k, v = self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)  # only the mean token's output is kept
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.c_proj(pooled[:, 0])


class ResamplerXL(nn.Module):
    def __init__(
        self,
        feature_dim: int,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        queries: int,
        cross_widths: tuple[int, int],
        ff_mult: int = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(feature_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), FeedForward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.unet_proj_1 = nn.Linear(dim, cross_widths[0])
        self.unet_proj_2 = nn.Linear(dim, cross_widths[1])
        self.unet_attnpool = AttentionPool(queries, dim, heads, cross_widths[1])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, N, D] -> (tokens [B, Q, w1 + w2], pooled [B, w2])."""
        x = self.proj_in(F.normalize(features, dim=1))  # over tokens, as the official code (see module doc)
        latents = self.latents.expand(len(features), -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(x, latents)
            latents = latents + feed_forward(latents)
        latents = self.norm_out(latents)
        tokens = torch.cat([self.unet_proj_1(latents), self.unet_proj_2(latents)], dim=-1)
        return tokens, self.unet_attnpool(latents)
