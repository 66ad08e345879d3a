"""SEED-Story's multimodal attention sink: keep the tokens around `<img>`/`</img>` of evicted images.

Two policies (paper §3.2; docs/paper_to_code.md, "Multimodal attention sink"):

* `MultimodalSinkPolicy` ("mm-sink", the corrected reading of the paper): the first `sink` tokens, the
  last `window` tokens, and for every image a *zone* of tokens next to its boundaries: `text_before`
  text tokens, `<img>` and the first `head_slots` image slots; the last `tail_slots` slots, `</img>`
  and `text_after` tokens after it. Zones of images that left the window stay as sinks, all bounded
  by `cap` entries: the oldest image's zone is dropped whole first. Keys are re-rotated (pos shift).
* `AsCodedPolicy` ("mm-sink-as-coded"): the `img_head_tail` index arithmetic of the official
  `src/inference/vis_george_sink.py`, reproduced slice for slice, quirks included, with post-RoPE
  keys that are never re-rotated.

Two controls separate the causes of the gap between them, which differ both in *what* they keep (the
official slicing overwrites the head of the window and copies sink entries again) and in *where* the kept keys
sit (re-rotated vs stale):

* `AsCodedRerotatedPolicy` ("mm-sink-as-coded-rerotated"): the official selection, entry for entry (quirks
  included), with keys re-rotated to slots 0..n-1 as mm-sink: only the selection differs from mm-sink.
* `StaleMultimodalSinkPolicy` ("mm-sink-stale"): mm-sink's selection with keys never re-rotated, as the
  official code: only the positions differ from mm-sink.

All four learn where images are from the token ids of each forward (`PolicyCache.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from labkit.caches.params import OFFICIAL_START, OFFICIAL_TEXT_AFTER, OFFICIAL_TEXT_BEFORE, CacheParams
from labkit.caches.policies import Policy


@dataclass
class ImageSpan:
    """Absolute positions of one image's `<img>` and (once seen) `</img>`."""

    boi: int
    eoi: int | None = None


class ImageLayout:
    """Finds `<img>` ... `</img>` spans in the token stream and checks they hold exactly Q slots."""

    def __init__(self, boi_id: int, eoi_id: int, num_image_tokens: int):
        self.boi_id, self.eoi_id, self.num_image_tokens = boi_id, eoi_id, num_image_tokens
        self.images: list[ImageSpan] = []

    def feed(self, token_ids: Sequence[int], start: int) -> None:
        for offset, token in enumerate(token_ids):
            pos = start + offset
            open_image = self.images[-1] if self.images and self.images[-1].eoi is None else None
            expected_eoi = None if open_image is None else open_image.boi + self.num_image_tokens + 1
            if token == self.boi_id:
                if open_image is not None:
                    raise ValueError(
                        f"<img> at position {pos}, but the image opened at {open_image.boi} has no </img> yet"
                    )
                self.images.append(ImageSpan(pos))
            elif token == self.eoi_id or pos == expected_eoi:
                if pos != expected_eoi or token != self.eoi_id:
                    raise ValueError(
                        f"token {token} at position {pos}: with num_image_tokens={self.num_image_tokens}, "
                        f"</img> must come exactly at <img> + Q + 1 (image opened at "
                        f"{None if open_image is None else open_image.boi})"
                    )
                open_image.eoi = pos

    def zone(self, image: ImageSpan, text_before: int, head: int, tail: int, text_after: int) -> list[int]:
        """Positions next to an image's boundaries; `</img>` is placed at <img> + Q + 1 before it is seen."""
        eoi = image.boi + self.num_image_tokens + 1
        around_boi = range(max(0, image.boi - text_before), image.boi + head + 1)
        around_eoi = range(eoi - tail, eoi + text_after + 1)
        return [*around_boi, *around_eoi]


class MultimodalSinkPolicy(Policy):
    """First `sink` + zones around the boundaries of earlier images + last `window`, at most `cap` entries."""

    name = "mm-sink"
    rerotates = True
    needs_token_ids = True

    def __init__(self, params: CacheParams):
        self.sink, self.window, self.cap = params.sink, params.window, params.cap
        self.counts = (params.text_before, params.head_slots, params.tail_slots, params.text_after)
        self.layout = ImageLayout(params.boi_id, params.eoi_id, params.num_image_tokens)
        self.reset()

    def reset(self) -> None:
        self.layout.images = []
        # Zone position -> index of the newest image whose zone contains it. A token in two zones
        # (short captions) belongs to the newer image, so it survives as long as possible.
        self._owner: dict[int, int] = {}

    @property
    def max_entries(self) -> int:
        return self.cap

    def observe(self, token_ids: Sequence[int], start: int) -> None:
        first_new = len(self.layout.images)
        self.layout.feed(token_ids, start)
        for index in range(first_new, len(self.layout.images)):
            for pos in self.layout.zone(self.layout.images[index], *self.counts):
                self._owner[pos] = index

    def select(self, entries: list[int]) -> list[int] | None:
        n = len(entries)
        if n <= self.sink + self.window:
            return None
        recent_from = n - self.window
        core: list[int] = []
        groups: dict[int, list[int]] = {}
        for i, pos in enumerate(entries):
            if pos < self.sink or i >= recent_from:
                core.append(i)
            elif (owner := self._owner.get(pos)) is not None:
                groups.setdefault(owner, []).append(i)
        budget = self.cap - len(core)
        kept = list(core)
        for owner in sorted(groups, reverse=True):  # newest image first: the oldest are dropped first
            if len(groups[owner]) > budget:
                break
            budget -= len(groups[owner])
            kept += groups[owner]
        kept.sort()
        kept_set = set(kept)
        for i, pos in enumerate(entries):  # an evicted token never comes back: forget its zone entry
            if i not in kept_set:
                self._owner.pop(pos, None)
        return kept


class StaleMultimodalSinkPolicy(MultimodalSinkPolicy):
    """Control: mm-sink's selection, keys left at the rotation they got when computed (never re-rotated).

    Why it exists: `mm-sink` vs `mm-sink-as-coded` confounds stale key positions with the official slicing
    (a window eaten by the overwrite/duplicate quirk). This policy keeps exactly the entries mm-sink keeps and
    positions them as the official code does: a key keeps the RoPE position it was computed at (the held-entry
    count at that time, `PolicyCache.rotation_positions`), and new tokens take position = held entries. Against
    `mm-sink` only the positions differ; against `mm-sink-as-coded` only the selection.
    """

    name = "mm-sink-stale"
    rerotates = False


class AsCodedPolicy(Policy):
    """The official `img_head_tail` eviction (`src/inference/vis_george_sink.py`), streamed token by token.

    What the official loop does between segments, and what this policy does at the end of the forward
    in which the (window_images+1)-th complete image of the context gets its `</img>`:

    * While more than `window_images` complete images are in context, drop the oldest segment: the
      context (`input_ids`) now starts right after that image's `</img>`.
    * `boi`, `eoi` are that image's indices in the context *before* the drop, used as indices into
      the cache: on the first eviction ``sink = kv[:4]`` (BOS + 3), then every eviction appends
      ``kv[boi-4 : boi+1+H]`` and ``kv[eoi-T : eoi+4]`` (H=7, T=8 at Q=64: 24 entries per image;
      H and T are scaled by Q/64, at least 1). The sink grows 28, 52, 76, ... with no cap.
    * The new cache is ``cat(sink, kv[eoi+1+len(sink):])``: the sink *overwrites* the first
      len(sink) tokens of the retained context instead of being prepended, so cache slot j >= len(sink)
      still holds context token j. Later evictions index ``boi-4`` in these cache coordinates, which
      fall inside the sink once the sink is longer than a caption: those entries are copied again
      (`kept_positions()` then lists a position twice). Slices follow Python's rules (a negative
      start wraps), exactly as the tensors were sliced.
    * Timing differs: the official loop trims the context *before* the forward that encodes the newly
      generated image, so that image never sees the evicted segment; here the plan applies at the end of the
      forward in which the new image gets its `</img>`, so its tokens still attend to the segment being
      evicted (docs/paper_to_code.md, "Eviction timing").
    * Keys keep the rotation they got when computed (post-RoPE, never re-rotated). New tokens take
      position = number of held entries (the model's default from `get_seq_length()`), which is the
      official position (index in the truncated context) as long as the retained context is longer
      than the sink, true for the official 8 images of 66+ tokens; if a tiny configuration makes the
      sink longer, the cache keeps the official slicing but positions continue from its length.
    """

    name = "mm-sink-as-coded"
    needs_token_ids = True

    def __init__(self, params: CacheParams):
        self.layout = ImageLayout(params.boi_id, params.eoi_id, params.num_image_tokens)
        self.window_images = params.window_images
        self.head_slots, self.tail_slots = params.head_slots, params.tail_slots
        self.reset()

    def reset(self) -> None:
        self.layout.images = []
        self.context_start = 0  # absolute position of the official input_ids[0]
        self.sink_length = 0  # entries at the head of the cache that are sinks
        self.evicted = 0  # images dropped from the context so far

    def observe(self, token_ids: Sequence[int], start: int) -> None:
        self.layout.feed(token_ids, start)

    def images_in_context(self) -> int:
        return sum(1 for image in self.layout.images[self.evicted :] if image.eoi is not None)

    def select(self, entries: list[int]) -> list[int] | None:
        plan = None
        while self.images_in_context() > self.window_images:
            plan = self._evict_oldest(list(range(len(entries))) if plan is None else plan)
        return plan

    def _evict_oldest(self, slots: list[int]) -> list[int]:
        image = self.layout.images[self.evicted]
        boi, eoi = image.boi - self.context_start, image.eoi - self.context_start
        sink = slots[: self.sink_length] if self.sink_length else slots[:OFFICIAL_START]
        sink = sink + slots[boi - OFFICIAL_TEXT_BEFORE : boi + 1 + self.head_slots]
        sink = sink + slots[eoi - self.tail_slots : eoi + OFFICIAL_TEXT_AFTER + 1]
        self.context_start += eoi + 1
        self.sink_length = len(sink)
        self.evicted += 1
        return sink + slots[eoi + 1 + len(sink) :]


class AsCodedRerotatedPolicy(AsCodedPolicy):
    """Control: the official `img_head_tail` selection, quirks included, with keys re-rotated to slots 0..n-1.

    Why it exists: the counterpart of `StaleMultimodalSinkPolicy`. It keeps the very entries `mm-sink-as-coded`
    keeps, in the same cache order (the sink overwriting the head of the window, entries copied twice), but,
    as `mm-sink`, stores pre-RoPE keys and rotates them to their current slot at every step (StreamingLLM pos
    shift; a duplicated entry gets each of its slots). New tokens take position = held entries in both, so
    against `mm-sink-as-coded` only the positions of held keys differ; against `mm-sink` only the selection.
    """

    name = "mm-sink-as-coded-rerotated"
    rerotates = True
