"""Where the MLLM's attention goes: the paper's attention-sink analysis (§3.2, Fig. 4, App. D, Table 5).

The paper finds attention concentrated on (1) the first tokens, (2) punctuation, (3) tokens next to `<img>`
and (4) tokens next to `</img>`, and builds the multimodal sink from (1), (3) and (4). Here every key
position gets a *key type* and attention is summed by type, per layer and head, so stories of thousands of
tokens stay cheap to show (aggregate by type or segment, never one cell per token pair).

A share only means something against chance: a query at position t that spread its attention evenly would
give 1/(t+1) to BOS. `sink ratio` = mean attention on a type / mean attention it would get if uniform.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from transformers import LlamaForCausalLM

from labkit.core.devices import module_device, to_module_device
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.models.mllm import MLLMBatch, SeedStoryMLLM

KEY_TYPES = ("bos", "punct", "boi", "image_head", "image", "image_tail", "eoi", "after_eoi", "inst", "text", "pad")
PUNCTUATION = {".", ",", "!", "?", ";", ":"}
SINK_SKIP = 32  # BOS-sink ratios leave out queries before this position (early queries have few keys to choose)


def key_types(input_ids: list[int], tokenizer: StoryTokenizer, head_slots: int = 2, tail_slots: int = 2) -> list[str]:
    """Label every position: BOS, punctuation, `<img>`, first/last image slots, `</img>`, the token after it, ..."""
    image_ids = set(tokenizer.image_token_ids)
    labels = []
    for position, token in enumerate(input_ids):
        if token == tokenizer.bos_id:
            labels.append("bos")
        elif token == tokenizer.pad_id:
            labels.append("pad")
        elif token == tokenizer.boi_id:
            labels.append("boi")
        elif token == tokenizer.eoi_id:
            labels.append("eoi")
        elif token == tokenizer.inst_id:
            labels.append("inst")
        elif token in image_ids:
            slot = tokenizer.image_token_ids.index(token)
            labels.append("image_head" if slot < head_slots else "image")
        elif position > 0 and input_ids[position - 1] == tokenizer.eoi_id:
            labels.append("after_eoi")
        elif tokenizer.decode([token]).strip() in PUNCTUATION:
            labels.append("punct")
        else:
            labels.append("text")
    # the last slots of each image are the ones right before `</img>`
    for position, token in enumerate(input_ids):
        if token == tokenizer.eoi_id:
            for back in range(1, tail_slots + 1):
                if position - back >= 0 and labels[position - back] in ("image", "image_head"):
                    labels[position - back] = "image_tail"
    return labels


@contextlib.contextmanager
def eager_attention(llm) -> Iterator[None]:
    """SDPA returns no weights: switch a `LlamaForCausalLM` to eager attention for a while."""
    previous = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


@torch.no_grad()
def attention_maps(model: SeedStoryMLLM, batch: MLLMBatch) -> list[torch.Tensor]:
    """Per layer, attention weights [B, heads, T, T] of the MLLM on a batch (image slots filled)."""
    llm = model.causal_lm
    batch = batch.to(module_device(llm))
    with eager_attention(llm):
        embeds = model.embed(batch.input_ids, batch.image_input, batch.input_features)
        out = llm.model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    return [a.float().cpu() for a in out.attentions]


@torch.no_grad()
def attention_maps_plain(llm, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, attention weights of a plain `LlamaForCausalLM` on token ids."""
    with eager_attention(llm):
        out = llm.model(input_ids=to_module_device(llm, input_ids), output_attentions=True, use_cache=False)
    return [a.float().cpu() for a in out.attentions]


def type_shares(maps: list[torch.Tensor], types: list[list[str]], skip: int = 8) -> dict[str, torch.Tensor]:
    """Mean attention mass per key type, per layer and head: {type: [layers, heads]}; queries < `skip` ignored."""
    shares = {}
    for kind in KEY_TYPES:
        mask = torch.tensor([[t == kind for t in row] for row in types], dtype=torch.float)  # [B, T]
        valid = torch.tensor([[t != "pad" for t in row] for row in types])
        valid[:, :skip] = False
        per_layer = []
        for weights in maps:  # [B, H, T, T]
            mass = (weights * mask[:, None, None, :]).sum(-1)  # [B, H, T]: attention of each query on this type
            per_layer.append((mass * valid[:, None, :]).sum((0, 2)) / valid.sum())
        shares[kind] = torch.stack(per_layer)
    return shares


def sink_ratios(maps: list[torch.Tensor], types: list[list[str]], skip: int = 8) -> dict[str, torch.Tensor]:
    """Attention on each key type divided by what uniform attention would give it, [layers, heads]."""
    shares = type_shares(maps, types, skip)
    ratios = {}
    for kind in KEY_TYPES:
        expected = []
        for row in types:
            is_kind = torch.tensor([t == kind for t in row], dtype=torch.float)
            seen = torch.cumsum(is_kind, 0) / torch.arange(1, len(row) + 1)  # uniform share over keys 0..t
            keep = torch.tensor([t != "pad" for t in row])
            keep[:skip] = False
            expected.append(seen[keep])
        uniform = torch.cat(expected).mean()
        ratios[kind] = shares[kind] / uniform if uniform > 0 else torch.zeros_like(shares[kind])
    return ratios


def top_key_counts(maps: list[torch.Tensor], types: list[list[str]], skip: int = 8) -> Counter:
    """Like the paper's Table 5: over every (layer, head, query), the type of the most-attended key."""
    counts: Counter = Counter()
    for weights in maps:
        top = weights.argmax(-1)  # [B, H, T]
        for row, row_types in enumerate(types):
            for query in range(skip, len(row_types)):
                if row_types[query] == "pad":
                    continue
                counts.update(row_types[k] for k in top[row, :, query].tolist())
    return counts


def sink_summary(model: SeedStoryMLLM, batch: MLLMBatch, tokenizer: StoryTokenizer) -> dict[str, float]:
    """The few numbers tracked during training: the largest per-layer (head-mean) sink ratio of each type."""
    types = [key_types(row.tolist(), tokenizer) for row in batch.input_ids]
    ratios = sink_ratios(attention_maps(model, batch), types)
    return {
        f"sink_{kind}": float(ratios[kind].mean(1).max())
        for kind in ("bos", "punct", "boi", "eoi", "image_head", "image_tail")
    }


def plain_bos_ratios(llm: LlamaForCausalLM, input_ids: torch.Tensor, pad_id: int, skip: int = SINK_SKIP) -> dict:
    """Per layer: attention from queries at positions >= `skip` to position 0 (`<s>`), divided by the uniform share
    1/(t+1) a query at t would give it; the mean over heads and queries, and the strongest head's mean."""
    maps = attention_maps_plain(llm.eval(), input_ids)
    valid = (input_ids != pad_id).float()
    valid[:, :skip] = 0
    uniform = 1 / torch.arange(1, input_ids.shape[1] + 1, dtype=torch.float)
    expected = (uniform * valid).sum()
    means, strongest = [], []
    for weights in maps:  # [B, H, T, T]
        per_head = (weights[..., 0] * valid[:, None, :]).sum((0, 2)) / expected  # [H]
        means.append(round(float(per_head.mean()), 3))
        strongest.append(round(float(per_head.max()), 3))
    return {"mean_over_heads": means, "strongest_head": strongest}


def multimodal_bos_ratios(
    model: SeedStoryMLLM, batch: MLLMBatch, tokenizer: StoryTokenizer, skip: int = SINK_SKIP
) -> dict[str, list[float]]:
    """`plain_bos_ratios` for the MLLM on multimodal samples (image slots filled from features)."""
    types = [key_types(row.tolist(), tokenizer) for row in batch.input_ids]
    ratios = sink_ratios(attention_maps(model, batch), types, skip)["bos"]  # [layers, heads]
    return {
        "mean_over_heads": [round(float(r), 3) for r in ratios.mean(1)],
        "strongest_head": [round(float(r), 3) for r in ratios.max(1).values],
    }
