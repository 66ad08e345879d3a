"""`PolicyCache`: a transformers `Cache` whose eviction is decided by a `Policy`.

How a forward of `LlamaForCausalLM` (transformers 5.x) meets the cache:

1. The model asks `get_seq_length()` for default position ids (arange from it) and
   `get_mask_sizes()` for the causal mask; both describe the n entries held *before* the step.
2. Each layer rotates its new keys with RoPE and calls `update(keys, values, layer_idx)`.
   At layer 0 the cache opens a step: it consumes the token ids given to `observe`, asks the
   policy which of the n + q entries to keep, and builds the RoPE tables of the step.
3. Every layer returns the n + q keys/values (the current tokens attend to all of them), then
   stores only the kept entries: eviction happens after the step, never before it. (The official loop,
   `src/inference/vis_george_sink.py`, trims its context before the forward that encodes a new image:
   docs/paper_to_code.md, "Eviction timing".)

Generation loops call `observe(input_ids)` before each forward (or use `forward_with_cache`),
so the image-boundary policies know where `<img>`/`</img>` are, and pass neither `position_ids`
(the defaults are right) nor an `attention_mask` (its length would be the story's, not the cache's).
Batches without padding work: every row holds the same entries; image markers must sit at the same
places in all rows. `generate()` is not supported: it slices its inputs assuming the cache holds
every token it was given, which an evicting cache does not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from transformers import LlamaConfig
from transformers.cache_utils import Cache

from labkit.caches.layers import AbsoluteLayer, PolicyLayer, ShiftedLayer, Step
from labkit.caches.policies import Policy
from labkit.caches.rope import Rotary


class PolicyCache(Cache):
    """K/V of all layers plus the absolute story positions of the entries they hold."""

    def __init__(self, policy: Policy, model_config: LlamaConfig):
        self.policy = policy
        self.rotary = Rotary(model_config) if policy.rerotates else None
        layers: list[PolicyLayer] = [
            ShiftedLayer(self.rotary, policy.max_entries) if self.rotary else AbsoluteLayer(policy.max_entries)
            for _ in range(model_config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self._positions: list[int] = []  # absolute position of each held entry, cache order
        self._rotations: list[int] = []  # position each held key was rotated with when it was computed
        self._seen = 0  # tokens fed so far (the story length)
        self._observed: int | None = None  # length of the ids given to `observe` for the next forward
        self._step: Step | None = None
        self._lookahead = False

    # ---- what the generation loop and the lab use -------------------------------------------

    @property
    def policy_name(self) -> str:
        return self.policy.name

    @property
    def tokens_seen(self) -> int:
        """Tokens fed to the cache so far: the absolute position of the next token."""
        return self._seen

    def observe(self, input_ids: torch.Tensor | Sequence[int]) -> None:
        """Tell the cache the token ids of the next forward ([batch, q], [q] or a list); call once per forward.

        Required by the image-boundary policies (mm-sink, mm-sink-as-coded and their controls), optional
        (only length-checked) for the others.
        When image features are fed as `inputs_embeds`, pass the ids those slots stand for.
        """
        if self._observed is not None:
            raise RuntimeError("observe() was called twice without a forward in between")
        ids = torch.as_tensor(input_ids)
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, q] or [q], got shape {tuple(ids.shape)}")
        if self.policy.needs_token_ids and ids.shape[0] > 1:
            layout = self.policy.layout
            markers = torch.where((ids == layout.boi_id) | (ids == layout.eoi_id), ids, -1)
            if not bool((markers == markers[:1]).all()):
                raise ValueError(
                    "all rows of a batch must have <img>/</img> at the same positions (they share one cache layout)"
                )
        if not self._lookahead:  # a look-ahead adds nothing to the story the policy tracks
            self.policy.observe(ids[0].tolist(), start=self._seen)
        self._observed = ids.shape[1]

    @contextlib.contextmanager
    def lookahead(self) -> Iterator["PolicyCache"]:
        """Forwards inside attend to the held entries but leave the cache exactly as it was.

        The generation loop uses it for an image's Q query slots: their hidden states are regressed to
        features, then the slots are fed again as input-resampled features, which is what the next
        segment's context holds in the official loop (`gen_george.py`: the image re-enters as regressed features).
        """
        self._lookahead = True
        try:
            yield self
        finally:
            self._lookahead, self._observed = False, None

    def kept_positions(self) -> list[int]:
        """Absolute story positions of the held entries, in cache order (a position may repeat in as-coded)."""
        return list(self._positions)

    def rotation_positions(self) -> list[int]:
        """The RoPE position each held key encodes: its slot 0..n-1 for re-rotating policies; for the others
        the position the model gave it (the held-entry count at the time), which no later step corrects."""
        return list(range(len(self._positions))) if self.rotary is not None else list(self._rotations)

    def nbytes(self) -> int:
        """Bytes of K/V held, all layers (pre-RoPE keys for re-rotating policies: same size)."""
        return sum(layer.nbytes() for layer in self.layers)

    # ---- the transformers Cache protocol -------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._step = self._open_step(key_states, kwargs.get("kwargs") or {})
        return self.layers[layer_idx].update(key_states, value_states, self._step)

    def reset(self) -> None:
        super().reset()
        self.policy.reset()
        self._positions, self._rotations, self._seen, self._observed, self._step = [], [], 0, None, None

    def _open_step(self, key_states: torch.Tensor, model_kwargs: dict[str, Any]) -> Step:
        q, n = key_states.shape[-2], len(self._positions)
        if self._observed is None and self.policy.needs_token_ids:
            raise RuntimeError(
                f"policy {self.policy.name!r} needs the token ids: "
                "call cache.observe(input_ids) before each forward (or use forward_with_cache)"
            )
        if self._observed is not None and self._observed != q:
            raise ValueError(f"observe() was given {self._observed} token ids but the forward has {q} tokens")
        self._observed = None
        if self.rotary is not None:
            self._check_positions(model_kwargs.get("position_ids"), n, q)

        if self._lookahead:
            keep = list(range(n))  # store nothing new, drop nothing old
        else:
            entries = self._positions + list(range(self._seen, self._seen + q))
            rotations = self._rotations + list(range(n, n + q))  # Llama's default positions: after the held entries
            keep = self.policy.select(entries)
            self._positions = entries if keep is None else [entries[i] for i in keep]
            self._rotations = rotations if keep is None else [rotations[i] for i in keep]
            self._seen += q

        device = key_states.device
        step = Step(keep=None if keep is None else torch.tensor(keep, dtype=torch.long, device=device))
        if self.rotary is not None:
            cos, sin = self.rotary.table(n + q, device)
            step.held_cos, step.held_sin, step.new_cos, step.new_sin = cos[:n], sin[:n], cos[n:], sin[n:]
        return step

    @staticmethod
    def _check_positions(position_ids: torch.Tensor | None, n: int, q: int) -> None:
        # A re-rotating cache puts held keys at slots 0..n-1; queries elsewhere would see wrong
        # distances (the position bugs of HF SinkCache, transformers #31581, #35350), so refuse them loudly.
        if position_ids is None:
            return
        expected = torch.arange(n, n + q, device=position_ids.device)
        if position_ids.shape[-1] != q or not bool((position_ids == expected).all()):
            raise ValueError(
                f"a re-rotating cache holds {n} entries at positions 0..{n - 1}: the new tokens must have "
                f"positions {n}..{n + q - 1} (pass no position_ids to get them), got {position_ids.tolist()}"
            )
