"""Long-story generation with any KV-cache policy (official `src/inference/gen_george.py`).

From a first caption and the first image's features, each new segment is:

1. `[INST]`, then the caption, greedy, until the model emits `<img>` (or, in story-visualization mode, the
   ground-truth caption, as `vis_george_sink.py`);
2. `<img>` and the Q `<img_xxxxx>` query slots: their last-layer hidden states go through the output
   resampler -> the regressed N×D features of the new image (the de-tokenizer draws them later);
3. the image re-enters the context as those regressed features through the input resampler (the official
   loop never re-encodes generated images with the ViT), then `</img>`.

Step 2 runs as a cache *look-ahead*: the query slots are dropped once regressed, as the official loop drops
them when it rebuilds the prompt. Policies are `labkit.caches` caches, plus `recompute-window`, the strategy
the released code actually runs (issue #36): every segment re-encodes the last K segments from scratch at
positions 0..L-1 (with `<s>` re-added, as `gen_george.py`) and uses a cache only inside the segment. Unlike
`gen_george.py`, which cuts `len('[INST]')` characters after the evicted image's `</img>`, it keeps the first
kept segment's `[INST]`.

Deliberate differences: `</s>` is banned so every policy writes the same number of segments (the official
loop stops when a call produces no image), and image tokens are banned outside images (officially a soft
ban: their logits are set to 0.0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from labkit.caches import IMAGE_POLICIES, POLICIES, forward_with_cache, make_cache
from labkit.core.errors import ParameterError
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.models.mllm import SeedStoryMLLM

STRATEGIES = (*POLICIES, "recompute-window")


@dataclass
class SegmentStep:
    """What one finished segment cost and what the cache held afterwards."""

    segment: int
    seconds: float
    kv_entries: int
    kv_bytes: int
    kept_positions: list[int]
    rotation_positions: list[int] | None = None  # RoPE position each held key encodes (see PolicyCache)


@dataclass
class StoryRun:
    policy: str
    params: dict
    captions: list[str]
    features: list[torch.Tensor]  # [N, D] per segment: the given first image, then regressed ones
    token_ids: list[int] = field(default_factory=list)  # the story as the context holds it
    token_types: list[str] = field(default_factory=list)  # bos / text / boi / image / eoi per position
    steps: list[SegmentStep] = field(default_factory=list)


class _Writer:
    """Feeds tokens (and image features) into the model through one cache, remembering the story."""

    def __init__(self, model: SeedStoryMLLM, tokenizer: StoryTokenizer, cache):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.body, self.head = model.causal_lm.model, model.causal_lm.lm_head
        self.device = next(model.parameters()).device
        self.ids: list[int] = []
        self.types: list[str] = []

    def feed(
        self, ids: list[int], types: list[str], features: torch.Tensor | None = None, record: bool = True
    ) -> torch.Tensor:
        """Run `ids` (image slots filled from `features` [1, N, D] when given); return the last hidden states."""
        tensor = torch.tensor([ids], device=self.device)
        slots = (
            torch.tensor([[t == "image" for t in types]], device=self.device)
            if features is not None
            else torch.zeros_like(tensor, dtype=torch.bool)
        )
        empty = torch.zeros((0, *self.model.output_resampler.pos_embed.shape), device=self.device)
        embeds = self.model.embed(tensor, slots, features if features is not None else empty)
        hidden = forward_with_cache(self.body, self.cache, tensor, inputs_embeds=embeds).last_hidden_state
        if record:
            self.ids += ids
            self.types += types
        return hidden

    def image_block(self, features: torch.Tensor) -> torch.Tensor:
        t = self.tokenizer
        q = self.model.num_queries
        return self.feed(
            [t.boi_id, *t.image_token_ids[:q], t.eoi_id], ["boi", *["image"] * q, "eoi"], features.unsqueeze(0)
        )

    def reencode(self, texts: list[list[int]], features: list[torch.Tensor]) -> torch.Tensor:
        """`<s>` + each segment's text ids (`[INST]` included after the first) and image, from scratch at
        positions 0..L-1: the released code's context each segment, except that `gen_george.py` strips the first
        kept segment's `[INST]` and this keeps it. Returns the last hidden states."""
        hidden = self.feed([self.tokenizer.bos_id], ["bos"])
        for ids, image in zip(texts, features):
            self.feed(ids, ["text"] * len(ids))
            hidden = self.image_block(image)
        return hidden

    def regress_next_image(self) -> torch.Tensor:
        """`<img>` + query slots as a look-ahead; the output resampler turns their hidden states into [N, D]."""
        t, q = self.tokenizer, self.model.num_queries
        with self.cache.lookahead():
            hidden = self.feed([t.boi_id, *t.image_token_ids[:q]], ["boi", *["image"] * q], record=False)
        return self.model.output_resampler(hidden[:, 1:]).squeeze(0)

    def segment(self, caption: str | None, max_tokens: int, exact: bool) -> tuple[str, torch.Tensor]:
        """One new segment: `[INST]`, a caption (written, or the given one), the regressed image fed back."""
        t = self.tokenizer
        hidden = self.feed([t.inst_id], ["text"])
        if caption is None:
            caption = self.write_caption(hidden, max_tokens, exact)
        else:
            ids = t.encode(caption)
            self.feed(ids, ["text"] * len(ids))
        features = self.regress_next_image()
        self.image_block(features)
        return caption, features

    def write_caption(self, hidden: torch.Tensor, max_tokens: int, exact: bool = False) -> str:
        """Greedy tokens until the model asks for `<img>` (forced after `max_tokens`; with `exact`, always
        `max_tokens` tokens, so a story's layout is known in advance, e.g. for cache traces)."""
        t = self.tokenizer
        banned = torch.tensor(
            [*t.image_token_ids, t.eoi_id, t.eos_id, t.bos_id, t.pad_id, t.inst_id, *([t.boi_id] if exact else [])],
            device=self.device,
        )
        written: list[int] = []
        for _ in range(max_tokens):
            logits = self.head(hidden[:, -1]).float()
            logits[:, banned] = float("-inf")
            token = int(logits.argmax(-1))
            if token == t.boi_id:
                break
            written.append(token)
            hidden = self.feed([token], ["text"])
        return t.decode(written, skip_special_tokens=True).strip()


def _cache_params(policy: str, params: dict, model: SeedStoryMLLM, tokenizer: StoryTokenizer) -> dict:
    if policy in IMAGE_POLICIES:
        return {"num_image_tokens": model.num_queries, "boi_id": tokenizer.boi_id, "eoi_id": tokenizer.eoi_id, **params}
    return dict(params)


def _opening(writer: _Writer, caption: str, features: torch.Tensor, with_inst: bool, with_bos: bool) -> torch.Tensor:
    t = writer.tokenizer
    ids, types = ([t.bos_id], ["bos"]) if with_bos else ([], [])
    if with_inst:
        ids, types = ids + [t.inst_id], types + ["text"]
    text = t.encode(caption)
    writer.feed(ids + text, types + ["text"] * len(text))
    return writer.image_block(features)


@torch.no_grad()
def generate_story(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    first_caption: str,
    first_features: torch.Tensor,
    segments: int = 25,
    policy: str = "mm-sink",
    params: dict | None = None,
    captions: list[str] | None = None,
    recompute_segments: int = 8,
    max_caption_tokens: int = 40,
    fixed_caption_tokens: bool = False,
) -> StoryRun:
    """Write a story of `segments` segments (the first one given) under one KV-cache policy or strategy.

    `params` are the cache's sizes (`window`, `sink`, `cap`, ...; see `labkit.caches.make_cache`).
    `captions` switches to story visualization: ground-truth captions, generated images.
    `fixed_caption_tokens` makes every written caption exactly `max_caption_tokens` tokens long.
    """
    if policy not in STRATEGIES:
        raise ParameterError("policy", f"unknown policy {policy!r}; choose one of {', '.join(STRATEGIES)}")
    if segments < 1:
        raise ParameterError("segments", f"must be >= 1 (got {segments})")
    if captions is not None and len(captions) < segments:
        raise ParameterError("captions", f"{len(captions)} captions for {segments} segments")
    if policy == "recompute-window" and recompute_segments < 1:
        raise ParameterError("recompute_segments", f"must be >= 1 (got {recompute_segments})")
    params = dict(params or {})
    model.eval()
    run = StoryRun(policy, params, [first_caption], [first_features])
    if policy == "recompute-window":
        _recompute_window(
            model, tokenizer, run, segments, captions, recompute_segments, max_caption_tokens, fixed_caption_tokens
        )
        return run
    cache = make_cache(policy, model.causal_lm.config, **_cache_params(policy, params, model, tokenizer))
    writer = _Writer(model, tokenizer, cache)
    start = time.perf_counter()
    _opening(writer, first_caption, first_features, with_inst=False, with_bos=True)
    _record(run, cache, 0, start)
    for segment in range(1, segments):
        start = time.perf_counter()
        caption, features = writer.segment(
            captions[segment] if captions else None, max_caption_tokens, fixed_caption_tokens
        )
        run.captions.append(caption)
        run.features.append(features)
        _record(run, cache, segment, start)
    run.token_ids, run.token_types = writer.ids, writer.types
    return run


def _record(run: StoryRun, cache, segment: int, start: float) -> None:
    run.steps.append(
        SegmentStep(
            segment,
            time.perf_counter() - start,
            cache.get_seq_length(),
            cache.nbytes(),
            cache.kept_positions(),
            cache.rotation_positions(),
        )
    )


def _text_ids(ids: list[int], types: list[str]) -> list[int]:
    """The text part of one segment's tokens: everything before its `<img>`."""
    return ids[: types.index("boi")]


def _recompute_window(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    run: StoryRun,
    segments: int,
    captions: list[str] | None,
    window: int,
    max_caption_tokens: int,
    exact: bool,
) -> None:
    """The released code's strategy: re-encode `<s>` + the last `window` segments from scratch each segment."""
    start = time.perf_counter()
    writer = _Writer(model, tokenizer, make_cache("dense", model.causal_lm.config))
    _opening(writer, run.captions[0], run.features[0], with_inst=False, with_bos=True)
    story_ids, story_types = list(writer.ids), list(writer.types)  # the whole story, for traces
    texts = [_text_ids(story_ids[1:], story_types[1:])]  # each segment's text ids, `[INST]` included after the first
    spans = [(1, len(story_ids))]  # story positions of each segment's tokens (after <s>)
    run.steps.append(
        SegmentStep(
            0,
            time.perf_counter() - start,
            writer.cache.get_seq_length(),
            writer.cache.nbytes(),
            list(range(len(story_ids))),
        )
    )
    for segment in range(1, segments):
        start = time.perf_counter()
        first = max(0, len(texts) - window)
        writer = _Writer(model, tokenizer, make_cache("dense", model.causal_lm.config))
        writer.reencode(texts[first:], run.features[first:])
        held = len(writer.ids)
        caption, features = writer.segment(captions[segment] if captions else None, max_caption_tokens, exact)
        run.captions.append(caption)
        run.features.append(features)
        new_ids, new_types = writer.ids[held:], writer.types[held:]
        texts.append(_text_ids(new_ids, new_types))
        spans.append((len(story_ids), len(story_ids) + len(new_ids)))
        story_ids += new_ids
        story_types += new_types
        positions = [0] + [p for a, b in spans[first:] for p in range(a, b)]
        run.steps.append(
            SegmentStep(
                segment, time.perf_counter() - start, writer.cache.get_seq_length(), writer.cache.nbytes(), positions
            )
        )
    run.token_ids, run.token_types = story_ids, story_types
