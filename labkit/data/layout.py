"""The official SEED-Story token layout of one training sample, with the masks a model needs.

Paper §3.2; official `src/data/story_telling.py::decode_long_story_data`::

    <s> c0 <img> q0..q(Q-1) </img> [INST] c1 <img> q.. </img> ... [INST] c(k+1) <img> q.. </img> </s>

Text always comes before its image. Context images fill their Q slots with input-resampled features
(`image_input`); the trained image's slots keep the learnable `<img_xxxxx>` embeddings and their
last-layer hidden states are regressed to its features (`image_output`). Labels follow the official
code: a trained segment's ``[INST]``, caption and ``<img>`` are text targets, its image tokens and
``</img>`` are masked (``labels[boi+1:eoi+1] = -100``), and the final ``</s>`` is a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from labkit.core.errors import ParameterError
from labkit.data.text_tokenizer import StoryTokenizer

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"
TOKEN_TYPES = ("bos", "text", "boi", "image", "eoi", "eos")


@dataclass(frozen=True)
class StoryLayout:
    """Token ids of one sample and, per position, what it is and what it is trained on."""

    input_ids: list[int]
    labels: list[int]  # unshifted, as Hugging Face's causal-LM loss expects; -100 = no loss
    token_types: list[str]  # one of TOKEN_TYPES; `[INST]` counts as text
    segment: list[int]  # story segment of each position (0 for BOS)
    image_index: list[int]  # which image a slot belongs to, -1 outside image slots
    image_input: list[bool]  # slots filled with input-resampled features (context images)
    image_output: list[bool]  # slots whose hidden states regress the target image's features

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def text_target(self) -> list[bool]:
        """Positions whose token carries next-token loss."""
        return [label != IGNORE_INDEX for label in self.labels]


def build_layout(
    captions: Sequence[str],
    tokenizer: StoryTokenizer,
    num_queries: int,
    text_loss: Sequence[int],
    image_loss: Sequence[int],
) -> StoryLayout:
    """Lay out `captions` (one image after each) with `num_queries` slots per image.

    `text_loss` / `image_loss` are the segments whose caption / image is trained (see `sampler.py`).
    """
    if not 1 <= num_queries <= tokenizer.num_image_tokens:
        raise ParameterError(
            "num_queries",
            f"must be in 1..{tokenizer.num_image_tokens} (the tokenizer's image tokens), got {num_queries}",
        )
    bad = [s for s in (*text_loss, *image_loss) if not 0 <= s < len(captions)]
    if bad:
        raise ParameterError("text_loss/image_loss", f"segments {bad} outside 0..{len(captions) - 1}")
    if 0 in text_loss:
        raise ParameterError("text_loss", "caption 0 opens the story and is never a text target (official layout)")

    ids: list[int] = []
    labels: list[int] = []
    types: list[str] = []
    segments: list[int] = []
    image_index: list[int] = []
    image_input: list[bool] = []
    image_output: list[bool] = []

    def emit(
        token: int,
        kind: str,
        segment: int,
        target: bool,
        image: int = -1,
        slot_in: bool = False,
        slot_out: bool = False,
    ) -> None:
        ids.append(token)
        labels.append(token if target else IGNORE_INDEX)
        types.append(kind)
        segments.append(segment)
        image_index.append(image)
        image_input.append(slot_in)
        image_output.append(slot_out)

    emit(tokenizer.bos_id, "bos", 0, False)
    for segment, caption in enumerate(captions):
        trained_text = segment in text_loss
        if segment > 0:  # `[INST]`: one token in the lab's BPE, several pieces in Llama-2's (plain text, official)
            for token in tokenizer.inst_ids:
                emit(token, "text", segment, trained_text)
        for token in tokenizer.encode(caption):
            emit(token, "text", segment, trained_text)
        emit(tokenizer.boi_id, "boi", segment, trained_text)
        generated = segment in image_loss
        for query in range(num_queries):
            emit(tokenizer.image_token_ids[query], "image", segment, False, segment, not generated, generated)
        emit(tokenizer.eoi_id, "eoi", segment, False)
    emit(tokenizer.eos_id, "eos", len(captions) - 1, True)
    return StoryLayout(ids, labels, types, segments, image_index, image_input, image_output)
