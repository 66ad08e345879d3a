"""Exercises on what a KV cache keeps (notebook 05): StreamingLLM's kept positions, the RoPE re-rotation of a kept
key, and the zone the multimodal sink keeps around an image's boundaries (paper §3.2).

References: `SinkPolicy.select` (labkit/caches/policies.py), `Rotary` (labkit/caches/rope.py, StreamingLLM's pos
shift), `ImageLayout.zone` (labkit/caches/image_sinks.py).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from labkit.caches.image_sinks import ImageLayout, ImageSpan
from labkit.caches.policies import SinkPolicy
from labkit.caches.rope import Rotary
from labkit.course.checks import Case, Exercise, Mistake, compare_positions, compare_tensors

# ---- StreamingLLM: which positions stay ------------------------------------------------------------------------


def _sink_reference(n_entries: int, sink: int, window: int) -> list[int]:
    kept = SinkPolicy(sink, window).select(list(range(n_entries)))
    return list(range(n_entries)) if kept is None else kept


def _sink_cases() -> list[Case]:
    return [
        Case(f"n_entries={n}, sink={s}, window={w}", (n, s, w))
        for n, s, w in [(10, 4, 8), (12, 4, 8), (40, 4, 24), (300, 4, 96), (50, 1, 10), (33, 0, 16), (7, 4, 3)]
    ]


def _compare_kept(got, expected: list[int]) -> str | None:
    # None means "keep everything", as the policies return it; right only when the reference keeps everything.
    if got is None and expected == list(range(len(expected))):
        return None
    return compare_positions(got, expected, what="kept position")


SINK_KEPT_POSITIONS = Exercise(
    name="sink_kept_positions",
    notebook="05",
    title="the positions StreamingLLM's sink cache keeps",
    signature="`sink_kept_positions(n_entries, sink, window) -> list of kept positions`",
    reference=_sink_reference,
    reference_name="labkit.caches.policies.SinkPolicy.select",
    cases=_sink_cases,
    compare=_compare_kept,
    mistakes=(
        Mistake(
            "the last sink + window tokens",
            lambda n, s, w: list(range(max(0, n - s - w), n)),
            "that is a window of sink + window tokens: the sink is the *first* `sink` tokens (BOS among them), "
            "kept however long the story grows.",
        ),
        Mistake(
            "window counted with the sink",
            lambda n, s, w: list(range(n)) if n <= w else list(range(s)) + list(range(n - (w - s), n)),
            "the window is counted apart from the sink: the cache holds sink + window entries.",
        ),
    ),
)

# ---- the RoPE re-rotation of a kept key ------------------------------------------------------------------------


def _rotary(head_dim: int) -> Rotary:
    return Rotary(LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2))


def _rerotate_reference(
    key: torch.Tensor, old_position: int, new_position: int, inv_freq: torch.Tensor
) -> torch.Tensor:
    rotary = _rotary(2 * inv_freq.numel())
    cos, sin = rotary.table(max(old_position, new_position) + 1, key.device)
    original = rotary.unrotate(key, cos[old_position], sin[old_position])
    return rotary.rotate(original, cos[new_position], sin[new_position])


def _rerotate_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(7)
    cases = []
    for head_dim, old, new in [(8, 5, 2), (16, 100, 4), (16, 37, 37), (32, 1000, 68), (64, 260, 4)]:
        rotary = _rotary(head_dim)
        cos, sin = rotary.table(old + 1, "cpu")
        key = rotary.rotate(torch.randn(3, head_dim, generator=generator), cos[old], sin[old])  # as Llama caches it
        cases.append(
            Case(
                f"head_dim={head_dim}, a key rotated at position {old} moved to slot {new}",
                (key, old, new, rotary.inv_freq.clone()),
            )
        )
    return cases


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    first, second = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = first * angles.cos() - second * angles.sin()
    out[..., 1::2] = first * angles.sin() + second * angles.cos()
    return out


def _rotate_halves(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


REROTATION_MISTAKES = (
    Mistake(
        "neighbouring pairs",
        lambda k, old, new, f: _rotate_pairs(k, (new - old) * f),
        "Llama pairs dimension i with i + head_dim/2 (`rotate_half`), not neighbours 2i and 2i+1.",
    ),
    Mistake(
        "rotated on top",
        lambda k, old, new, f: _rotate_halves(k, new * f),
        "the key already carries the rotation of its old position: undo it (or rotate by new - old), otherwise "
        "it points to old + new.",
    ),
)

ROPE_REROTATION = Exercise(
    name="rope_rerotation",
    notebook="05",
    title="moving a cached key to a new position (StreamingLLM's pos shift)",
    signature="`rerotate(key, old_position, new_position, inv_freq) -> key at new_position`",
    reference=_rerotate_reference,
    reference_name="labkit.caches.rope.Rotary (unrotate, then rotate)",
    cases=_rerotate_cases,
    compare=lambda got, expected: compare_tensors(got, expected, atol=1e-4),
    mistakes=REROTATION_MISTAKES,
)

# ---- the multimodal sink's zone around an image --------------------------------------------------------------


def _zone_reference(
    boi: int, num_image_tokens: int, text_before: int, head: int, tail: int, text_after: int
) -> list[int]:
    layout = ImageLayout(boi_id=-1, eoi_id=-2, num_image_tokens=num_image_tokens)
    return layout.zone(ImageSpan(boi), text_before, head, tail, text_after)


def _zone_cases() -> list[Case]:
    return [
        Case(f"<img> at {boi}, Q={q}, text_before={b}, head={h}, tail={t}, text_after={a}", (boi, q, b, h, t, a))
        for boi, q, b, h, t, a in [(10, 4, 2, 1, 1, 2), (30, 64, 2, 1, 1, 2), (1, 8, 3, 2, 2, 0), (50, 16, 0, 0, 3, 1)]
    ]


ZONE_MISTAKES = (
    Mistake(
        "</img> at <img> + Q",
        lambda boi, q, b, h, t, a: [*range(max(0, boi - b), boi + h + 1), *range(boi + q - t, boi + q + a + 1)],
        "an image takes Q slots between its markers, so `</img>` sits at <img> + Q + 1.",
    ),
    Mistake(
        "negative positions kept",
        lambda boi, q, b, h, t, a: [*range(boi - b, boi + h + 1), *range(boi + q + 1 - t, boi + q + 1 + a + 1)],
        "an image near the start has fewer than `text_before` tokens before it: clip at position 0.",
    ),
)

IMAGE_SINK_ZONE = Exercise(
    name="image_sink_zone",
    notebook="05",
    title="the positions the multimodal sink keeps around one image",
    signature="`image_zone(boi, num_image_tokens, text_before, head, tail, text_after) -> list of positions`",
    reference=_zone_reference,
    reference_name="labkit.caches.image_sinks.ImageLayout.zone",
    cases=_zone_cases,
    compare=lambda got, expected: compare_positions(got, expected, what="zone position"),
    mistakes=ZONE_MISTAKES,
)

SINK_EXERCISES = (SINK_KEPT_POSITIONS, ROPE_REROTATION, IMAGE_SINK_ZONE)
