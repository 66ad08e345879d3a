"""Per-layer K/V storage of the policy caches (transformers 5.x `CacheLayerMixin`).

The model calls `update` with the keys (already rotated by RoPE) and values of the tokens of this
forward. A layer returns *everything the current tokens may attend to* (held entries + new ones) and
only then applies the step's eviction plan, so the current step never loses context it should see
(see `policy_cache.py`). The plan is computed once per forward by `PolicyCache` and shared by all layers.

Tensors are [batch, kv_heads, entries, head_dim]; every row of the batch holds the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from labkit.caches.rope import Rotary


@dataclass
class Step:
    """What one forward does to every layer: keep these entries afterwards, and the RoPE tables to use."""

    keep: torch.Tensor | None  # indices into [held entries, new entries] to store; None keeps all
    held_cos: torch.Tensor | None = None  # rotation of held slots 0..n-1 (re-rotating layers only)
    held_sin: torch.Tensor | None = None
    new_cos: torch.Tensor | None = None  # angles the model used for the new keys, slots n..n+q-1
    new_sin: torch.Tensor | None = None


class PolicyLayer(CacheLayerMixin):
    """Common bookkeeping; subclasses say how keys are stored and returned."""

    def __init__(self, max_entries: int | None = None):
        super().__init__()
        self.max_entries = max_entries

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The new tokens see every held entry and each other causally: kv index 0 is slot 0.
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1 if self.max_entries is None else self.max_entries

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def _store(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None) -> None:
        if keep is None:
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = keys.index_select(-2, keep), values.index_select(-2, keep)


class AbsoluteLayer(PolicyLayer):
    """Keeps keys exactly as the model rotated them (dense, and the official code's no-re-rotation)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self._store(keys, values, step.keep)
        return keys, values


class ShiftedLayer(PolicyLayer):
    """Stores pre-RoPE keys and rotates them to their slot 0..n-1 at every step (StreamingLLM pos shift)."""

    def __init__(self, rotary: Rotary, max_entries: int | None = None):
        super().__init__(max_entries)
        self.rotary = rotary

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.rotary.rotate(self.keys, step.held_cos, step.held_sin)
        keys = torch.cat([held, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        originals = torch.cat([self.keys, self.rotary.unrotate(key_states, step.new_cos, step.new_sin)], dim=-2)
        self._store(originals, values, step.keep)
        return keys, values
