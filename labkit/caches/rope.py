"""Rotary position embedding (RoPE) helpers for caches that move keys to new positions.

StreamingLLM's "pos shift" (`streaming_llm/pos_shift/modify_llama.py`) gives every kept key the position of its
slot in the cache, 0..n-1, so positions stay inside the trained range however long the story gets.
Llama in transformers rotates keys *before* calling the cache, so a re-rotating cache receives
post-RoPE keys. We un-rotate each new key once (with the position the model used) and store the
pre-RoPE key; at every step the stored keys are rotated once, from those originals, to their current
slot. A key is never rotated a second time on top of an earlier rotation, so rounding cannot pile up
over thousands of shifts (a known pitfall: the old HF SinkCache re-rotated rotated keys in the key
dtype).

Conventions follow Llama's in transformers: the two halves of the head dimension form the complex
pairs ("rotate half"), angles are position · inv_freq computed in fp32, and cos/sin are multiplied by
the rope type's attention scaling. The frequencies come from the model's own rotary module so that
rope types with static frequencies (default, linear, llama3, yarn, ...) match the model exactly.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from labkit.core.errors import ParameterError

# Their frequencies change with the sequence length, so a key cannot be moved by a fixed rotation.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Multiply each (x1, x2) pair, stored as two halves of the last dimension, by i: (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """cos/sin tables of one model's RoPE, and rotation of keys to (or back from) given positions."""

    def __init__(self, config: LlamaConfig):
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in LENGTH_DEPENDENT_ROPE:
            raise ParameterError(
                "model_config",
                f"rope_type {rope_type!r} depends on the sequence length; re-rotating caches need a fixed RoPE",
            )
        module = LlamaRotaryEmbedding(config)
        self.inv_freq = module.inv_freq.detach().float().cpu()
        self.scaling = float(module.attention_scaling)
        self._cos = torch.empty(0, 2 * self.inv_freq.numel())
        self._sin = self._cos

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin of positions 0..length-1, shape [length, head_dim]; grown and kept between calls."""
        if self._cos.shape[0] < length or self._cos.device != torch.device(device):
            size = max(length, 2 * self._cos.shape[0], 64)
            positions = torch.arange(size, device=device, dtype=torch.int64)
            freqs = positions[:, None].float() * self.inv_freq.to(device)[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = angles.cos() * self.scaling, angles.sin() * self.scaling
        return self._cos[:length], self._sin[:length]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., L, D] by the angles of cos/sin [L, D]; computed in fp32, returned in x's dtype."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Undo `rotate` with the same cos/sin: rotate by the opposite angles and remove the scaling twice."""
        xf = x.float()
        return ((xf * cos - rotate_half(xf) * sin) / (self.scaling * self.scaling)).to(x.dtype)
