"""Parameters of the KV-cache policies, checked before any work is done (paper §3.2, Table 2).

Sizes are in tokens. Every mistake a user can make (an unknown policy, a typo in a keyword, a
non-positive size, a window smaller than the sink, a missing required size) raises
`labkit.core.errors.ParameterError` naming the parameter, so a CLI can report it without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from labkit.core.errors import ParameterError

POLICIES = ("dense", "window", "sink", "mm-sink", "mm-sink-as-coded", "mm-sink-stale", "mm-sink-as-coded-rerotated")
# The two selections around image boundaries, each with its control (same parameters, the other key positions):
MM_SINK_POLICIES = ("mm-sink", "mm-sink-stale")  # the paper's zones + window + cap
AS_CODED_POLICIES = ("mm-sink-as-coded", "mm-sink-as-coded-rerotated")  # the official `img_head_tail` slices
IMAGE_POLICIES = MM_SINK_POLICIES + AS_CODED_POLICIES  # need num_image_tokens, boi_id, eoi_id

# Slot counts of the official `img_head_tail` selection, written for 64 image slots (official `vis_george_sink.py`):
# kv[boi-4 : boi+8] keeps 7 slots after <img>, kv[eoi-8 : eoi+4] keeps 8 slots before </img>.
OFFICIAL_SLOTS = 64
OFFICIAL_HEAD_SLOTS = 7
OFFICIAL_TAIL_SLOTS = 8
OFFICIAL_TEXT_BEFORE = 4
OFFICIAL_TEXT_AFTER = 3
OFFICIAL_START = 4  # BOS + the first 3 tokens of the opening caption

_REQUIRED = {
    "dense": (),
    "window": ("window",),
    "sink": ("window",),
    "mm-sink": ("window", "cap", "num_image_tokens", "boi_id", "eoi_id"),
    "mm-sink-as-coded": ("num_image_tokens", "boi_id", "eoi_id"),
    "mm-sink-stale": ("window", "cap", "num_image_tokens", "boi_id", "eoi_id"),
    "mm-sink-as-coded-rerotated": ("num_image_tokens", "boi_id", "eoi_id"),
}


def scaled_slots(official_count: int, num_image_tokens: int) -> int:
    """Scale a slot count of the 64-slot official code to `num_image_tokens` slots (round half up, at least 1)."""
    return max(1, (official_count * num_image_tokens + OFFICIAL_SLOTS // 2) // OFFICIAL_SLOTS)


@dataclass(frozen=True)
class CacheParams:
    """All knobs of all policies; each policy reads the ones it needs (see `make_cache`)."""

    window: int | None = None  # recent tokens kept (window, sink, mm-sink)
    sink: int = 4  # first tokens kept (sink, mm-sink); StreamingLLM's default
    cap: int | None = None  # total entries bound of mm-sink (and mm-sink-stale)
    num_image_tokens: int | None = None  # Q, image slots between <img> and </img>
    boi_id: int | None = None  # token id of <img>
    eoi_id: int | None = None  # token id of </img>
    text_before: int = OFFICIAL_TEXT_BEFORE  # mm-sink: text tokens kept before <img>
    head_slots: int | None = None  # mm-sink: slots kept after <img> (default 7·Q/64)
    tail_slots: int | None = None  # mm-sink: slots kept before </img> (default 8·Q/64)
    text_after: int = OFFICIAL_TEXT_AFTER  # mm-sink: tokens kept after </img>
    window_images: int = 8  # mm-sink-as-coded(-rerotated): images kept in context (`vis_george_sink.py`)

    @property
    def image_group(self) -> int:
        """Entries an evicted image keeps in mm-sink: 24 with the defaults at Q=64."""
        return self.text_before + 1 + self.head_slots + self.tail_slots + 1 + self.text_after


def parse_params(policy: str, given: dict[str, Any]) -> CacheParams:
    """Check `policy` and the keyword arguments given to `make_cache`; fill defaults that depend on Q."""
    if policy not in POLICIES:
        raise ParameterError("policy", f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    known = {f.name for f in fields(CacheParams)}
    for name in given:
        if name not in known:
            raise ParameterError(name, f"unknown cache parameter; known: {', '.join(sorted(known))}")
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(name, f"must be an integer, got {value!r}")
        may_be_zero = name in ("text_before", "head_slots", "tail_slots", "text_after", "boi_id", "eoi_id")
        if value < 0 or (value == 0 and not may_be_zero):
            raise ParameterError(name, f"must be {'>= 0' if may_be_zero else 'positive'}, got {value}")
    for name in _REQUIRED[policy]:
        if given.get(name) is None:
            raise ParameterError(name, f"policy {policy!r} needs {name}")

    params = CacheParams(**{k: v for k, v in given.items() if v is not None})
    if policy in ("sink", *MM_SINK_POLICIES) and params.window < params.sink:
        raise ParameterError("window", f"must be at least the sink ({params.sink}), got {params.window}")
    if policy in IMAGE_POLICIES:
        params = _check_images(params)
    if policy in MM_SINK_POLICIES and params.cap < params.sink + params.window:
        raise ParameterError("cap", f"must be at least sink + window = {params.sink + params.window}, got {params.cap}")
    return params


def _check_images(params: CacheParams) -> CacheParams:
    q = params.num_image_tokens
    if params.boi_id == params.eoi_id:
        raise ParameterError("eoi_id", f"must differ from boi_id ({params.boi_id})")
    head = scaled_slots(OFFICIAL_HEAD_SLOTS, q) if params.head_slots is None else params.head_slots
    tail = scaled_slots(OFFICIAL_TAIL_SLOTS, q) if params.tail_slots is None else params.tail_slots
    for name, value in (("head_slots", head), ("tail_slots", tail)):
        if value > q:
            raise ParameterError(name, f"must be at most num_image_tokens ({q}), got {value}")
    return replace(params, head_slots=head, tail_slots=tail)
