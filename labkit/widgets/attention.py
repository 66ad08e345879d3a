"""The attention explorer: where the trained MLLM's attention goes over a long story (paper §3.2, Fig. 4).

One teacher-forced pass over a test story (`labkit.inference.attention.attention_maps`, eager attention) gives
every layer's attention, for one of three models: the MLLM on the story with its images; the MLLM's language model
on the captions alone, as plain text after `<s>`; the language model pre-trained before stage 2 (`labkit train
lm`, where the lab's sink study grows the BOS sink: `labkit.experiments.sink_emergence`) on the same text. The
controls only re-aggregate it, so they answer at once. For the query segments picked, the plot shows their
attention over the story's key positions (binned: thousands of tokens stay readable), the key types under it (BOS,
image boundaries, image slots, text, punctuation) and what a KV policy would still hold when the last picked
segment starts; the bars give the share of attention that goes to BOS, to the image boundaries mm-sink keeps, to
punctuation, to the recent window, and to everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from labkit.caches import make_policy
from labkit.core.artifacts import require
from labkit.core.presets import get_preset
from labkit.data.layout import build_layout
from labkit.data.lm_corpus import story_documents
from labkit.experiments.cache_trace import policy_params
from labkit.experiments.story_ablation import training_window_tokens
from labkit.inference.attention import attention_maps, attention_maps_plain, key_types
from labkit.inference.generate import layout_cache_params
from labkit.models.mllm import collate
from labkit.training.lm import NAME as LM
from labkit.training.lm import load_lm
from labkit.viz.plots import TOKEN_COLOURS
from labkit.widgets.common import PlotArea, explorer, reference_inputs

BOUNDARY = ("boi", "image_head", "image_tail", "eoi", "after_eoi")  # what the multimodal sink keeps around images
TYPE_COLOURS = {**TOKEN_COLOURS, "image_head": "#e6a23c", "image_tail": "#e6a23c", "after_eoi": "#937860"}
TYPE_COLOURS.update(punct="#55a868", inst="#4c72b0", pad="#ffffff")
OVERLAYS = ("none", "window", "sink", "mm-sink", "mm-sink-as-coded")
SOURCES = {
    "mllm": "MLLM: the story with its images",
    "mllm_text": "MLLM's language model: captions only",
    "lm": "pre-trained LM (before stage 2): captions only",
}
BIN = 4  # key positions per column of the map


@dataclass
class StoryAttention:
    """A story's attention: `maps[layer]` [heads, T, T], each position's key type and 0-based segment."""

    maps: list[torch.Tensor]
    types: list[str]
    segment_of: np.ndarray
    input_ids: list[int]
    segments: int


def story_attention(model, tokenizer, captions: list[str], features: torch.Tensor) -> StoryAttention:
    """Teacher-force one story (its captions and true image features, the official layout) and keep every
    layer's attention."""
    layout = build_layout(captions, tokenizer, model.num_queries, [], [])
    batch = collate([layout], [features], tokenizer.pad_id)
    maps = [layer[0] for layer in attention_maps(model, batch)]
    ids = batch.input_ids[0].tolist()
    ends = np.cumsum([token == tokenizer.eoi_id for token in ids])  # a segment ends with its `</img>`
    segment_of = np.minimum(np.concatenate([[0], ends[:-1]]), len(captions) - 1)
    return StoryAttention(maps, key_types(ids, tokenizer), segment_of, ids, len(captions))


def plain_story_attention(llm, tokenizer, captions: list[str]) -> StoryAttention:
    """A language model's attention on a story's captions as plain text after `<s>` (the pre-training layout,
    `labkit.data.lm_corpus.story_documents`: `[INST]` between captions)."""
    ids = story_documents(tokenizer, [captions])[0]
    lengths = [len(tokenizer.encode(text)) + (1 if k else 0) for k, text in enumerate(captions)]
    segment_of = np.concatenate([[0], np.repeat(np.arange(len(captions)), lengths)])
    maps = [layer[0] for layer in attention_maps_plain(llm, torch.tensor([ids]))]
    return StoryAttention(maps, key_types(ids, tokenizer), segment_of, ids, len(captions))


def held_positions(story: StoryAttention, policy: str, params: dict, upto: int) -> np.ndarray:
    """Which key positions `policy` still holds when segment `upto` (0-based) starts, the story fed one segment
    per forward (the policy objects the caches use, `labkit.caches.make_policy`)."""
    held = np.zeros(len(story.types), bool)
    if policy == "none":
        return held
    rule = make_policy(policy, **params)
    positions: list[int] = []
    for segment in range(upto):
        chunk = [p for p in np.flatnonzero(story.segment_of == segment).tolist()]
        rule.observe([story.input_ids[p] for p in chunk], start=chunk[0])
        entries = positions + chunk
        keep = rule.select(entries)
        positions = entries if keep is None else [entries[i] for i in keep]
    held[positions] = True
    return held


def attention_shares(story: StoryAttention, layer: int, head: int | None, first: int, last: int, window: int) -> dict:
    """Mean attention mass of the queries of segments first..last (0-based) on BOS, image boundaries,
    punctuation, the recent `window` keys, and the rest (head None: mean over heads)."""
    weights = story.maps[layer]
    weights = weights.mean(0) if head is None else weights[head]  # [T, T]
    queries = np.flatnonzero((story.segment_of >= first) & (story.segment_of <= last))
    types = np.asarray(story.types)
    groups = {"BOS": types == "bos", "image boundaries": np.isin(types, BOUNDARY), "punctuation": types == "punct"}
    shares = {name: 0.0 for name in (*groups, "recent window", "rest")}
    for query in queries:
        row = weights[query, : query + 1].numpy()
        claimed = np.zeros(query + 1, bool)
        for name, mask in groups.items():
            shares[name] += float(row[mask[: query + 1]].sum())
            claimed |= mask[: query + 1]
        recent = np.zeros(query + 1, bool)
        recent[max(0, query + 1 - window) :] = True
        shares["recent window"] += float(row[recent & ~claimed].sum())
        shares["rest"] += float(row[~recent & ~claimed].sum())
    return {name: value / max(1, len(queries)) for name, value in shares.items()}


def plot_attention(story: StoryAttention, layer: int, head: int | None, first: int, last: int, held, window: int):
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, to_rgb

    if not 0 <= first <= last < story.segments:
        raise ValueError(f"segments: pick a range within 1..{story.segments} (got {first + 1}..{last + 1})")
    weights = story.maps[layer]
    weights = weights.mean(0) if head is None else weights[head]
    length = len(story.types)
    columns = (length + BIN - 1) // BIN
    rows = []
    for segment in range(first, last + 1):
        queries = np.flatnonzero(story.segment_of == segment)
        mean = weights[queries].mean(0).numpy()  # [T]: this segment's queries, averaged
        rows.append(np.pad(mean, (0, columns * BIN - length)).reshape(columns, BIN).sum(1))
    figure, axes = plt.subplots(
        3, 1, figsize=(12, 6.5), gridspec_kw={"height_ratios": [0.5, 3, 1.6]}, constrained_layout=True
    )
    strip = np.array([[to_rgb(TYPE_COLOURS.get(t, "#999999")) for t in story.types]])
    overlay = np.where(held[None, :, None], np.array(to_rgb("#2ca02c")), np.array(to_rgb("#eeeeee")))
    axes[0].imshow(np.concatenate([strip, overlay]), aspect="auto", interpolation="nearest", extent=(0, length, 2, 0))
    axes[0].set(yticks=[0.5, 1.5], yticklabels=["key type", "held"], xticks=[])
    image = axes[1].imshow(
        np.maximum(np.array(rows), 1e-5),
        aspect="auto",
        norm=LogNorm(vmin=1e-4, vmax=1),
        extent=(0, length, last + 1.5, first + 0.5),
        cmap="magma",
    )
    axes[1].set(xlabel="key position", ylabel="query segment", xlim=(0, length))
    figure.colorbar(image, ax=axes[1], label=f"attention per {BIN} keys")
    shares = attention_shares(story, layer, head, first, last, window)
    axes[2].barh(list(shares), list(shares.values()), color=["#222222", "#dd8452", "#55a868", "#4c72b0", "#999999"])
    axes[2].set(xlim=(0, 1), xlabel="share of attention (queries of the picked segments)")
    axes[2].invert_yaxis()
    who = "mean of heads" if head is None else f"head {head}"
    axes[0].set_title(f"layer {layer}, {who}, query segments {first + 1}-{last + 1}")
    return figure


def _reference(preset: str):
    """The model, tokenizer, test frames and features, and the training length in tokens (the recent window)."""
    inputs = reference_inputs(preset)
    chunk = get_preset(preset).data.chunk_length
    window = training_window_tokens(inputs.tokenizer, inputs.frames.captions, chunk, inputs.model.num_queries)
    return inputs.model, inputs.tokenizer, inputs.frames, inputs.features, window


def attention_explorer(preset: str = "tiny", segments: int = 25):
    """Story, layer, head and query-segment pickers, and the policy whose held keys to overlay."""
    import ipywidgets as widgets

    model, tokenizer, frames, features, window = _reference(preset)
    heads, layers = model.causal_lm.config.num_attention_heads, model.causal_lm.config.num_hidden_layers
    controls = {
        "model": widgets.Dropdown(options=[(v, k) for k, v in SOURCES.items()], description="model"),
        "story": widgets.BoundedIntText(value=0, min=0, max=frames.stories - 1, description="test story"),
        "layer": widgets.IntSlider(value=0, min=0, max=layers - 1, description="layer"),
        "head": widgets.Dropdown(options=[("mean", None)] + [(str(h), h) for h in range(heads)], description="head"),
        "segments": widgets.IntRangeSlider(value=(11, segments), min=1, max=segments, description="queries"),
        "overlay": widgets.Dropdown(options=OVERLAYS, value="mm-sink", description="held by"),
    }
    area = PlotArea()

    @lru_cache(maxsize=1)
    def pretrained_lm():
        return load_lm(require(LM, preset), get_preset(preset))[0]

    @lru_cache(maxsize=8)
    def story(source: str, index: int) -> StoryAttention:
        captions = frames.captions[index][:segments]
        if source == "mllm":
            return story_attention(model, tokenizer, captions, features[index, :segments])
        llm = model.causal_lm if source == "mllm_text" else pretrained_lm()
        return plain_story_attention(llm, tokenizer, captions)

    def draw():
        index = controls["story"].value
        if not 0 <= index < frames.stories:
            raise ValueError(f"test story: must be in 0..{frames.stories - 1} (got {index})")
        attention = story(controls["model"].value, index)
        first, last = (s - 1 for s in controls["segments"].value)
        policy = controls["overlay"].value
        params = {} if policy == "none" else policy_params(policy, window=window, sink=4, cap=384)
        held = held_positions(attention, policy, layout_cache_params(policy, params, model, tokenizer), last)
        return plot_attention(attention, controls["layer"].value, controls["head"].value, first, last, held, window)

    return explorer(controls, area, draw, [2, 2, 2])
