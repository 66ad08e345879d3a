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
from typing import Callable

import torch
from tqdm.auto import tqdm

from labkit.caches import IMAGE_POLICIES, POLICIES, forward_with_cache, make_cache
from labkit.caches.ragged import RaggedCache
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
    """Feeds tokens (and image features) into the model for a batch of stories, one cache per story,
    remembering each story. Methods take `rows`, the stories of this forward (indices into the batch).

    One story runs through its `PolicyCache` as a plain forward. Several run as one forward through a
    `RaggedCache` (`labkit.caches.ragged`): their caches hold different entries, so each row gets its own
    positions and attention mask."""

    def __init__(self, model: SeedStoryMLLM, tokenizer: StoryTokenizer, caches: list):
        self.model, self.tokenizer, self.caches = model, tokenizer, list(caches)
        self.ragged = RaggedCache(self.caches) if len(self.caches) > 1 else None
        self.body, self.head = model.causal_lm.model, model.causal_lm.lm_head
        self.device = next(model.parameters()).device
        self.ids: list[list[int]] = [[] for _ in self.caches]
        self.types: list[list[str]] = [[] for _ in self.caches]

    @property
    def all_rows(self) -> list[int]:
        return list(range(len(self.caches)))

    def feed(
        self,
        rows: list[int],
        ids: list[list[int]],
        types: list[list[str]],
        features: torch.Tensor | None = None,
        record: bool = True,
    ) -> torch.Tensor:
        """Run `ids[k]` in story `rows[k]` (image slots filled from `features` [B, N, D] when given, in row
        order); return the hidden states [B, q, H], row k's own tokens first (the rest is padding)."""
        width = max(len(row_ids) for row_ids in ids)
        tensor = torch.tensor([row_ids + [self.tokenizer.pad_id] * (width - len(row_ids)) for row_ids in ids])
        tensor = tensor.to(self.device)
        slots = torch.tensor(
            [[t == "image" for t in row_types] + [False] * (width - len(row_types)) for row_types in types],
            device=self.device,
        )
        if features is None:
            slots = torch.zeros_like(slots)
            features = torch.zeros((0, *self.model.output_resampler.pos_embed.shape), device=self.device)
        embeds = self.model.embed(tensor, slots, features)
        if len(rows) == 1:
            cache = self.caches[rows[0]]
            hidden = forward_with_cache(self.body, cache, tensor, inputs_embeds=embeds).last_hidden_state
        else:
            positions, mask = self.ragged.inputs(rows, ids, self.device)
            hidden = self.body(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=self.ragged, use_cache=True
            ).last_hidden_state
        if record:
            for k, r in enumerate(rows):
                self.ids[r] += ids[k]
                self.types[r] += types[k]
        return hidden

    def image_block(self, rows: list[int], features: torch.Tensor) -> torch.Tensor:
        """`<img>`, the Q slots holding `features` [B, N, D] (input-resampled), `</img>` in every row."""
        t, q = self.tokenizer, self.model.num_queries
        ids, types = [t.boi_id, *t.image_token_ids[:q], t.eoi_id], ["boi", *["image"] * q, "eoi"]
        return self.feed(rows, [ids] * len(rows), [types] * len(rows), features)

    def reencode(self, texts: list[list[list[int]]], features: list[list[torch.Tensor]]) -> torch.Tensor:
        """`<s>` + each segment's text ids (`[INST]` included after the first) and image, from scratch at
        positions 0..L-1, for every story (row k: `texts[k]`, `features[k]`, as many segments in each row): the
        released code's context each segment, except that `gen_george.py` strips the first kept segment's
        `[INST]` and this keeps it. Returns the hidden states of the last image block."""
        rows = self.all_rows
        hidden = self.feed(rows, [[self.tokenizer.bos_id]] * len(rows), [["bos"]] * len(rows))
        for segment in range(len(texts[0])):
            ids = [row[segment] for row in texts]
            self.feed(rows, ids, [["text"] * len(row_ids) for row_ids in ids])
            hidden = self.image_block(rows, torch.stack([row[segment] for row in features]))
        return hidden

    def regress_next_image(self, rows: list[int]) -> torch.Tensor:
        """`<img>` + query slots as a look-ahead; the output resampler turns their hidden states into [B, N, D]."""
        t, q = self.tokenizer, self.model.num_queries
        ids, types = [t.boi_id, *t.image_token_ids[:q]], ["boi", *["image"] * q]
        with self.ragged.lookahead() if self.ragged else self.caches[rows[0]].lookahead():
            hidden = self.feed(rows, [ids] * len(rows), [types] * len(rows), record=False)
        return self.model.output_resampler(hidden[:, 1:])

    def segment(self, captions: list[str] | None, max_tokens: int, exact: bool) -> tuple[list[str], torch.Tensor]:
        """One new segment in every story: `[INST]`, a caption (written, or the given ones), the regressed image
        fed back. Returns the captions and the regressed features [B, N, D]."""
        t, rows = self.tokenizer, self.all_rows
        separator = t.inst_ids  # one special token in the lab's BPE, several pieces in Llama-2's (official)
        hidden = self.feed(rows, [separator] * len(rows), [["text"] * len(separator)] * len(rows))
        if captions is None:
            captions = self.write_captions(hidden[:, -1], max_tokens, exact)
        else:
            ids = [t.encode(caption) for caption in captions]
            self.feed(rows, ids, [["text"] * len(row_ids) for row_ids in ids])
        features = self.regress_next_image(rows)
        self.image_block(rows, features)
        return captions, features

    def write_captions(self, last_hidden: torch.Tensor, max_tokens: int, exact: bool = False) -> list[str]:
        """Greedy tokens in every story (`last_hidden` [B, H]) until it asks for `<img>` (forced after
        `max_tokens`; with `exact`, always `max_tokens` tokens, so a story's layout is known in advance, e.g. for
        cache traces). Stories that finished wait while the others go on writing."""
        t = self.tokenizer
        # a one-token `[INST]` is banned inside a caption; Llama-2's pieces of it are ordinary text
        separator = t.inst_ids if len(t.inst_ids) == 1 else []
        banned = torch.tensor(
            [*t.image_token_ids, t.eoi_id, t.eos_id, t.bos_id, t.pad_id, *separator, *([t.boi_id] if exact else [])],
            device=self.device,
        )
        written: list[list[int]] = [[] for _ in self.caches]
        writing, hidden = self.all_rows, last_hidden
        for _ in range(max_tokens):
            logits = self.head(hidden).float()
            logits[:, banned] = float("-inf")
            tokens = logits.argmax(-1).tolist()
            going = [k for k, token in enumerate(tokens) if token != t.boi_id]
            if not going:
                break
            writing, tokens = [writing[k] for k in going], [tokens[k] for k in going]
            for r, token in zip(writing, tokens):
                written[r].append(token)
            hidden = self.feed(writing, [[token] for token in tokens], [["text"]] * len(writing))[:, -1]
        return [t.decode(row, skip_special_tokens=True).strip() for row in written]


def layout_cache_params(policy: str, params: dict, model: SeedStoryMLLM, tokenizer: StoryTokenizer) -> dict:
    """`params` plus what the image-boundary policies need to find images: Q slots and the `<img>`/`</img>` ids."""
    if policy in IMAGE_POLICIES:
        return {"num_image_tokens": model.num_queries, "boi_id": tokenizer.boi_id, "eoi_id": tokenizer.eoi_id, **params}
    return dict(params)


def _opening(
    writer: _Writer, openings: list[tuple[str, torch.Tensor]], with_inst: bool, with_bos: bool
) -> torch.Tensor:
    """Each story's first segment: (`<s>`) (`[INST]`) its given caption, then its given image's block."""
    t, rows = writer.tokenizer, writer.all_rows
    head_ids, head_types = ([t.bos_id], ["bos"]) if with_bos else ([], [])
    if with_inst:
        head_ids, head_types = head_ids + t.inst_ids, head_types + ["text"] * len(t.inst_ids)
    texts = [t.encode(caption) for caption, _ in openings]
    writer.feed(rows, [head_ids + text for text in texts], [head_types + ["text"] * len(text) for text in texts])
    return writer.image_block(rows, torch.stack([features for _, features in openings]))


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
    return generate_stories(
        model,
        tokenizer,
        [(first_caption, first_features)],
        segments,
        policy,
        params,
        None if captions is None else [captions],
        recompute_segments,
        max_caption_tokens,
        fixed_caption_tokens,
    )[0]


@torch.no_grad()
def generate_stories(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    openings: list[tuple[str, torch.Tensor]],
    segments: int = 25,
    policy: str = "mm-sink",
    params: dict | None = None,
    captions: list[list[str]] | None = None,
    recompute_segments: int = 8,
    max_caption_tokens: int = 40,
    fixed_caption_tokens: bool = False,
    progress: bool = False,
    on_segment: Callable[[list[StoryRun]], None] | None = None,
) -> list[StoryRun]:
    """`generate_story` for several stories at once, one per opening (first caption, first features [N, D]),
    written as one batch: each story keeps its own cache, so each story is what it would be alone, up to float
    rounding. A step's wall time is the batch's, shared evenly between its stories (`SegmentStep.seconds`).
    `progress` shows a bar over segments. `on_segment(runs)` is called after every segment (the opening
    included), so a front end can show a story as it is written; it may raise `StopGeneration` to end the stories
    there (they keep the segments written so far)."""
    if policy not in STRATEGIES:
        raise ParameterError("policy", f"unknown policy {policy!r}; choose one of {', '.join(STRATEGIES)}")
    if segments < 1:
        raise ParameterError("segments", f"must be >= 1 (got {segments})")
    if not openings:
        raise ParameterError("openings", "give at least one story opening")
    if captions is not None and (len(captions) != len(openings) or min(map(len, captions)) < segments):
        raise ParameterError("captions", f"give every story at least {segments} captions")
    if policy == "recompute-window" and recompute_segments < 1:
        raise ParameterError("recompute_segments", f"must be >= 1 (got {recompute_segments})")
    params = dict(params or {})
    model.eval()
    runs = [StoryRun(policy, params, [caption], [features]) for caption, features in openings]
    given = lambda segment: None if captions is None else [story[segment] for story in captions]  # noqa: E731
    bar = _Progress(
        tqdm(total=segments, desc=f"{policy}: {len(runs)} stories", unit="segment", disable=not progress),
        on_segment,
        runs,
    )
    if policy == "recompute-window":
        with bar:
            _recompute_window(
                model,
                tokenizer,
                runs,
                segments,
                given,
                recompute_segments,
                max_caption_tokens,
                fixed_caption_tokens,
                bar,
            )
        return runs
    caches = [
        make_cache(policy, model.causal_lm.config, **layout_cache_params(policy, params, model, tokenizer))
        for _ in openings
    ]
    writer = _Writer(model, tokenizer, caches)
    with bar:
        start = time.perf_counter()
        _opening(writer, openings, with_inst=False, with_bos=True)
        _record(runs, caches, 0, start)
        bar.update()
        for segment in range(1, segments):
            start = time.perf_counter()
            written, features = writer.segment(given(segment), max_caption_tokens, fixed_caption_tokens)
            for run, caption, image in zip(runs, written, features):
                run.captions.append(caption)
                run.features.append(image.cpu())  # stories are saved and scored on the CPU wherever the model ran
            _record(runs, caches, segment, start)
            bar.update()
    for run, ids, types in zip(runs, writer.ids, writer.types):
        run.token_ids, run.token_types = ids, types
    return runs


class StopGeneration(Exception):
    """Raised by an `on_segment` callback of `generate_stories` to end the stories after the current segment."""


class _Progress:
    """The segment bar of `generate_stories`, which also calls its `on_segment` hook; a `StopGeneration` raised by
    the hook ends the `with` block quietly."""

    def __init__(self, bar, on_segment, runs: list[StoryRun]):
        self.bar, self.on_segment, self.runs = bar, on_segment, runs

    def update(self, count: int = 1) -> None:
        self.bar.update(count)
        if self.on_segment is not None:
            self.on_segment(self.runs)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, kind, error, trace) -> bool:
        self.bar.close()
        return kind is not None and issubclass(kind, StopGeneration)


def _record(runs: list[StoryRun], caches: list, segment: int, start: float) -> None:
    """Each story's step: the batch's wall time shared evenly, and what its own cache holds."""
    seconds = (time.perf_counter() - start) / len(runs)
    for run, cache in zip(runs, caches):
        run.steps.append(
            SegmentStep(
                segment,
                seconds,
                cache.get_seq_length(),
                cache.nbytes(),
                cache.kept_positions(),
                cache.rotation_positions(),
            )
        )


def _text_ids(ids: list[int], types: list[str]) -> list[int]:
    """The text part of one segment's tokens: everything before its `<img>`."""
    return ids[: types.index("boi")]


def _dense_writer(model: SeedStoryMLLM, tokenizer: StoryTokenizer, stories: int) -> _Writer:
    return _Writer(model, tokenizer, [make_cache("dense", model.causal_lm.config) for _ in range(stories)])


def _recompute_window(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    runs: list[StoryRun],
    segments: int,
    given,
    window: int,
    max_caption_tokens: int,
    exact: bool,
    bar,
) -> None:
    """The released code's strategy: re-encode `<s>` + the last `window` segments from scratch each segment."""
    start = time.perf_counter()
    writer = _dense_writer(model, tokenizer, len(runs))
    _opening(writer, [(run.captions[0], run.features[0]) for run in runs], with_inst=False, with_bos=True)
    stories = [_Story(ids, types) for ids, types in zip(writer.ids, writer.types)]
    _record(runs, writer.caches, 0, start)
    for run, story in zip(runs, stories):
        run.steps[0].kept_positions, run.steps[0].rotation_positions = list(range(len(story.ids))), None
    try:  # a `StopGeneration` from `bar` ends the stories early: they still get their tokens
        bar.update()
        for segment in range(1, segments):
            start = time.perf_counter()
            first = max(0, segment - window)
            writer = _dense_writer(model, tokenizer, len(runs))
            writer.reencode([story.texts[first:] for story in stories], [run.features[first:] for run in runs])
            held = [len(ids) for ids in writer.ids]
            written, features = writer.segment(given(segment), max_caption_tokens, exact)
            seconds = (time.perf_counter() - start) / len(runs)
            for k, (run, story) in enumerate(zip(runs, stories)):
                run.captions.append(written[k])
                run.features.append(features[k].cpu())
                story.add(writer.ids[k][held[k] :], writer.types[k][held[k] :])
                cache = writer.caches[k]
                run.steps.append(
                    SegmentStep(segment, seconds, cache.get_seq_length(), cache.nbytes(), story.positions(first))
                )
            bar.update()
    finally:
        for run, story in zip(runs, stories):
            run.token_ids, run.token_types = story.ids, story.types


@dataclass
class _Story:
    """A recompute-window story as a whole: its tokens, each segment's text ids, each segment's positions."""

    ids: list[int]
    types: list[str]
    texts: list[list[int]] = field(default_factory=list)  # `[INST]` included after the first segment
    spans: list[tuple[int, int]] = field(default_factory=list)  # story positions of each segment (after <s>)

    def __post_init__(self):
        self.ids, self.types = list(self.ids), list(self.types)
        self.texts = [_text_ids(self.ids[1:], self.types[1:])]
        self.spans = [(1, len(self.ids))]

    def add(self, ids: list[int], types: list[str]) -> None:
        self.texts.append(_text_ids(ids, types))
        self.spans.append((len(self.ids), len(self.ids) + len(ids)))
        self.ids += ids
        self.types += types

    def positions(self, first: int) -> list[int]:
        """The story positions the context holds when it re-encodes segments `first`..: `<s>` and theirs."""
        return [0] + [p for a, b in self.spans[first:] for p in range(a, b)]
