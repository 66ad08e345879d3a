"""KV-cache policies for long story generation: dense, window, StreamingLLM sink, SEED-Story sinks.

Paper §3.2 and Table 2; official `src/inference/vis_george_sink.py` (`img_head_tail`); StreamingLLM;
docs/paper_to_code.md, "Multimodal attention sink".

    cache = make_cache("mm-sink", model.config, window=256, sink=4, cap=512,
                       num_image_tokens=64, boi_id=BOI, eoi_id=EOI)
    out = forward_with_cache(model, cache, input_ids)      # = cache.observe(ids); model(..., cache=cache)
    cache.kept_positions(), cache.nbytes(), cache.get_seq_length()

Policies, sizes in tokens:

| policy | keeps | positions of held keys |
|---|---|---|
| dense | everything | absolute (equals DynamicCache) |
| window | last `window` | slots 0..n-1, re-rotated |
| sink | first `sink` + last `window` | slots 0..n-1, re-rotated |
| mm-sink | first `sink` + image zones (a) + last `window`, <= `cap` | slots 0..n-1, re-rotated |
| mm-sink-as-coded | the official `img_head_tail` slices (b) | as computed, never re-rotated |
| mm-sink-stale | as mm-sink (control: positions alone) | as computed, never re-rotated |
| mm-sink-as-coded-rerotated | as mm-sink-as-coded (control: selection alone) | slots 0..n-1, re-rotated |

(a) zones around `<img>`/`</img>` of earlier images; (b) window of `window_images` images.

New tokens always take the positions right after the held entries (`get_seq_length()`), which is
what Llama does when no `position_ids` are passed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig

from labkit.caches.image_sinks import (
    AsCodedPolicy,
    AsCodedRerotatedPolicy,
    MultimodalSinkPolicy,
    StaleMultimodalSinkPolicy,
)
from labkit.caches.params import IMAGE_POLICIES, POLICIES, CacheParams, parse_params, scaled_slots
from labkit.caches.policies import DensePolicy, Policy, SinkPolicy, WindowPolicy
from labkit.caches.policy_cache import PolicyCache
from labkit.core.errors import ParameterError

__all__ = [
    "IMAGE_POLICIES",
    "POLICIES",
    "CacheParams",
    "PolicyCache",
    "Policy",
    "make_cache",
    "make_policy",
    "forward_with_cache",
    "scaled_slots",
]


def make_policy(policy: str, **params: Any) -> Policy:
    """The selection rule alone (no tensors): handy for plots of what each policy keeps."""
    p = parse_params(policy, params)
    if policy == "dense":
        return DensePolicy()
    if policy == "window":
        return WindowPolicy(p.window)
    if policy == "sink":
        return SinkPolicy(p.sink, p.window)
    if policy == "mm-sink":
        return MultimodalSinkPolicy(p)
    if policy == "mm-sink-stale":
        return StaleMultimodalSinkPolicy(p)
    if policy == "mm-sink-as-coded-rerotated":
        return AsCodedRerotatedPolicy(p)
    return AsCodedPolicy(p)


def make_cache(policy: str, model_config: LlamaConfig, **params: Any) -> PolicyCache:
    """A fresh cache for one story (or one batch of same-layout stories) of a Llama model.

    Keyword sizes: `window`, `sink` (default 4), `cap` (mm-sink); image layout for the image-boundary
    policies: `num_image_tokens` (Q), `boi_id`, `eoi_id`; mm-sink zone sizes `text_before` (4),
    `head_slots` (7·Q/64), `tail_slots` (8·Q/64), `text_after` (3); `window_images` (8) for
    mm-sink-as-coded. The controls take their parent's parameters (mm-sink-stale those of mm-sink,
    mm-sink-as-coded-rerotated those of mm-sink-as-coded). Bad values raise `ParameterError` before
    anything is allocated.
    """
    chosen = make_policy(policy, **params)
    _check_model_config(model_config)
    return PolicyCache(chosen, model_config)


def forward_with_cache(
    model: torch.nn.Module,
    cache: PolicyCache,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
):
    """One forward through `cache`: tell it the token ids, then run the model (without position_ids).

    Pass `inputs_embeds` to feed image features in the slots; `input_ids` still says which tokens they are.
    """
    cache.observe(input_ids)
    if inputs_embeds is not None:
        return model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, **kwargs)
    return model(input_ids=input_ids, cache=cache, use_cache=True, **kwargs)


def _check_model_config(config: Any) -> None:
    needed = ("num_hidden_layers", "num_attention_heads", "hidden_size")
    missing = [name for name in needed if not isinstance(getattr(config, name, None), int)]
    if missing:
        raise ParameterError("model_config", f"expected a LlamaConfig; missing {', '.join(missing)}")
