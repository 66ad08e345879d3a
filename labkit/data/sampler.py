"""Which segments of a story a training sample holds, and which of them carry loss.

The official sampler (`src/data/story_telling.py::decode_long_story_data`) draws
``k = random.randint(0, story_len - 2)``: segments 0..k are context, segment k+1 is the target, and only
the target's caption and image carry loss. A sample therefore holds 2..L segments (2..10 for the
released 10-frame chunks), and segment 0's caption is never trained as text.

The all-segments variant keeps the whole story in one sample and puts text loss on every caption after
the first (the same captions the official sampler trains, in one pass instead of L-1 draws). Only the
last image is regressed: an image slot holds either input features or learnable queries, never both,
so earlier images must stay inputs (regressing them from their own input slots would leak the answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

from labkit.core.errors import ParameterError

Frame = TypeVar("Frame")

SAMPLERS = ("random-length", "all-segments")


@dataclass(frozen=True)
class StorySample:
    """A prefix of a story with the segments that carry loss.

    `images` holds whatever the caller passed (paths, arrays, features); `captions` and `images` have the
    same length. `text_loss` and `image_loss` are segment indices into them.
    """

    captions: tuple[str, ...]
    images: tuple
    text_loss: tuple[int, ...]
    image_loss: tuple[int, ...]

    @property
    def context_segments(self) -> int:
        """k in the paper's notation: how many segments come before the first trained one, minus one."""
        return min(self.text_loss + self.image_loss) - 1


def _check_length(captions: Sequence[str], images: Sequence) -> int:
    if len(captions) != len(images):
        raise ParameterError("images", f"{len(images)} images for {len(captions)} captions")
    if len(captions) < 2:
        raise ParameterError("captions", f"a story sample needs at least 2 segments, got {len(captions)}")
    return len(captions)


def random_length_sample(captions: Sequence[str], images: Sequence, rng: random.Random) -> StorySample:
    """The official sampler: context k ~ U{0, .., L-2}, target segment k+1."""
    length = _check_length(captions, images)
    k = rng.randint(0, length - 2)  # inclusive on both ends, as Python's random.randint in the official code
    target = k + 1
    return StorySample(tuple(captions[: target + 1]), tuple(images[: target + 1]), (target,), (target,))


def all_segments_sample(captions: Sequence[str], images: Sequence) -> StorySample:
    """The whole story: text loss on captions 1..L-1, image loss on the last image."""
    length = _check_length(captions, images)
    return StorySample(tuple(captions), tuple(images), tuple(range(1, length)), (length - 1,))


def make_sample(sampler: str, captions: Sequence[str], images: Sequence, rng: random.Random) -> StorySample:
    """Dispatch on the sampler's name (`random-length` or `all-segments`)."""
    if sampler == "random-length":
        return random_length_sample(captions, images, rng)
    if sampler == "all-segments":
        return all_segments_sample(captions, images)
    raise ParameterError("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
