"""Exercises on the training stages: the sampler and loss mask (notebooks 01, 04), the contrastive loss (02), guidance
and the Euler step (03), the cosine regression loss (04), what the official adaptation trains (06).

Each reference below calls the labkit code the lab's results come from; the cases are made here, from fixed seeds,
and never shown in the notebooks.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler

from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.course.checks import (
    Case,
    Exercise,
    Mistake,
    compare_flags,
    compare_names,
    compare_tensors,
)
from labkit.data.layout import build_layout
from labkit.data.sampler import random_length_sample
from labkit.data.storystream_mini import load_tokenizer
from labkit.models.contrastive import clip_loss
from labkit.models.detokenizer import SDXL_SCHEDULE, Detokenizer
from labkit.models.mllm import cosine_loss

# ---- 01: the random-length sampler (official `decode_long_story_data`) ------------------------------------------


def _sampler_reference(story_length: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
    sample = random_length_sample(["caption"] * story_length, list(range(story_length)), rng)
    return len(sample.captions), list(sample.text_loss), list(sample.image_loss)


def _sampler_cases() -> list[Case]:
    return [
        Case(f"a story of {n} segments, random.Random({seed})", (n, random.Random(seed)))
        for n, seed in [(2, 0), (10, 1), (10, 2), (10, 3), (7, 11), (25, 5), (3, 8)]
    ]


def _sampler_off_by_one(story_length: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
    target = rng.randint(0, story_length - 1) + 1
    return target + 1, [target], [target]


def _sampler_all_captions(story_length: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
    target = rng.randint(0, story_length - 2) + 1
    return target + 1, list(range(1, target + 1)), [target]


def _compare_sample(got, expected) -> str | None:
    if not isinstance(got, tuple) or len(got) != 3:
        return f"returned {got!r}, expected a tuple (segments kept, text-loss segments, image-loss segments)"
    for name, mine, theirs in zip(("segments kept", "text-loss segments", "image-loss segments"), got, expected):
        if (list(mine) if not isinstance(mine, int) else mine) != theirs:
            return f"{name}: you return {mine!r}, the official sampler gives {theirs!r}"
    return None


RANDOM_LENGTH_SAMPLER = Exercise(
    name="random_length_sampler",
    notebook="01",
    title="the official random-length sampler",
    signature="`sample_segments(story_length, rng) -> (segments_kept, text_loss, image_loss)`",
    reference=_sampler_reference,
    reference_name="labkit.data.sampler.random_length_sample",
    cases=_sampler_cases,
    compare=_compare_sample,
    mistakes=(
        Mistake(
            "k drawn from 0..L-1",
            _sampler_off_by_one,
            "k is drawn from 0..L-2 (`random.randint` includes both ends): the target k+1 must be a real segment.",
        ),
        Mistake(
            "text loss on every caption",
            _sampler_all_captions,
            "only the target segment k+1 carries loss in the official sampler; the context captions are inputs.",
        ),
    ),
)

# ---- 02: the CLIP-style contrastive loss ------------------------------------------------------------------------


def _clip_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(2)
    cases = []
    for images, texts in [(4, 4), (6, 6), (8, 5), (5, 2)]:
        logits = torch.randn(images, texts, generator=generator) * 3
        index = torch.arange(images) % texts if images != texts else torch.randperm(images, generator=generator)
        shared = "every text its own image" if images == texts else f"{images - texts} texts shared by two images"
        cases.append(Case(f"{images} images, {texts} distinct texts, {shared}", (logits, index)))
    return cases


def _clip_one_way(logits: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, text_index)


def _clip_text_one_positive(logits: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    first_image = torch.stack([(text_index == t).nonzero()[0, 0] for t in range(logits.shape[1])])
    return (F.cross_entropy(logits, text_index) + F.cross_entropy(logits.T, first_image)) / 2


CONTRASTIVE_LOSS = Exercise(
    name="contrastive_loss",
    notebook="02",
    title="the symmetric contrastive (InfoNCE) loss",
    signature="`contrastive_loss(logits, text_index) -> scalar tensor`",
    reference=clip_loss,
    reference_name="labkit.models.contrastive.clip_loss",
    cases=_clip_cases,
    compare=lambda got, expected: compare_tensors(got, expected, atol=1e-5),
    mistakes=(
        Mistake(
            "image to text only",
            _clip_one_way,
            "that is the image -> text half alone; CLIP averages it with the text -> image cross-entropy.",
        ),
        Mistake(
            "one positive per text",
            _clip_text_one_positive,
            "a text shared by k images has k positives: its target is uniform over them, not the first one.",
        ),
    ),
)

# ---- 03: classifier-free guidance and the Euler step (diffusers' EulerDiscreteScheduler) ---------------------


def _guidance_reference(unconditional: torch.Tensor, conditional: torch.Tensor, scale: float) -> torch.Tensor:
    # the line in Detokenizer._sample_batch
    return unconditional + scale * (conditional - unconditional)


def _guidance_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(3)
    return [
        Case(
            f"noise predictions of shape {shape}, guidance scale {scale}",
            (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), scale),
        )
        for shape, scale in [((1, 4, 8, 8), 3.0), ((2, 4, 8, 8), 1.0), ((3, 4, 4, 4), 7.5), ((1, 4, 2, 2), 0.0)]
    ]


CLASSIFIER_FREE_GUIDANCE = Exercise(
    name="classifier_free_guidance",
    notebook="03",
    title="classifier-free guidance",
    signature="`guided_noise(unconditional, conditional, scale) -> tensor`",
    reference=_guidance_reference,
    reference_name="labkit.models.detokenizer.Detokenizer._sample_batch",
    cases=_guidance_cases,
    compare=compare_tensors,
    mistakes=(
        Mistake(
            "guided from the conditional",
            lambda u, c, s: c + s * (c - u),
            "guidance starts from the unconditional prediction: u + s (c - u), so that s = 1 gives c exactly.",
        ),
    ),
)


def _euler_cases() -> list[Case]:
    # Each case: diffusers' own step from the de-tokenizer's schedule (SDXL's), at one step of a `steps`-step run.
    generator = torch.Generator().manual_seed(4)
    cases = []
    for step, steps in [(0, 10), (4, 10), (9, 10), (0, 25), (13, 25)]:
        sample, noise = torch.randn(1, 4, 8, 8, generator=generator) * 5, torch.randn(1, 4, 8, 8, generator=generator)
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE)
        scheduler.set_timesteps(steps)
        scheduler.set_begin_index(step)
        scheduler.scale_model_input(sample, scheduler.timesteps[step])  # marks the input scaled, as a pipeline does
        expected = scheduler.step(noise, scheduler.timesteps[step], sample).prev_sample
        sigma, sigma_next = float(scheduler.sigmas[step]), float(scheduler.sigmas[step + 1])
        cases.append(
            Case(
                f"step {step} of {steps}: sigma {sigma:.4g} -> {sigma_next:.4g}",
                (sample, noise, sigma, sigma_next),
                expected=expected,
            )
        )
    return cases


EULER_STEP = Exercise(
    name="euler_step",
    notebook="03",
    title="one Euler step of the de-tokenizer's sampler",
    signature="`euler_step(sample, noise, sigma, sigma_next) -> tensor`",
    reference=None,  # each case carries diffusers' answer
    reference_name="diffusers.EulerDiscreteScheduler.step (the de-tokenizer's sampler)",
    cases=_euler_cases,
    compare=lambda got, expected: compare_tensors(got, expected, atol=1e-4),
    mistakes=(
        Mistake(
            "jumped to the clean estimate",
            lambda x, eps, sigma, sigma_next: x - sigma * eps,
            "x - sigma * eps is the denoised estimate x0; an Euler step moves only to the next noise level: "
            "x + (sigma_next - sigma) * eps.",
        ),
    ),
)

# ---- 04: the cosine regression loss and the text loss mask ------------------------------------------------------


def _cosine_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(5)
    shapes = [(2, 16, 64), (1, 4, 8), (3, 64, 32)]
    return [
        Case(
            f"predicted and target features of shape {s}",
            (torch.randn(s, generator=generator), torch.randn(s, generator=generator)),
        )
        for s in shapes
    ]


COSINE_REGRESSION_LOSS = Exercise(
    name="cosine_regression_loss",
    notebook="04",
    title="the cosine regression loss of the output resampler",
    signature="`cosine_regression_loss(predicted, target) -> scalar tensor`",
    reference=cosine_loss,
    reference_name="labkit.models.mllm.cosine_loss",
    cases=_cosine_cases,
    compare=compare_tensors,
    mistakes=(
        Mistake(
            "mean squared error",
            lambda p, t: F.mse_loss(p, t),
            "the official loss is 1 - cosine similarity (`cosine_loss`), not MSE: only the direction counts.",
        ),
        Mistake(
            "cosine over the wrong axis",
            lambda p, t: (1 - F.cosine_similarity(p, t, dim=1)).mean(),
            "the cosine is taken over the feature dimension (the last one), one per image token.",
        ),
    ),
)


_NUM_QUERIES = 4


def _tokenizer():
    return load_tokenizer(project_root() / "data_samples" / "storystream-mini")


def _mask_cases() -> list[Case]:
    tokenizer = _tokenizer()
    captions = ["Mia finds a map.", "She runs to the hill, fast!", "A fox waits.", "They laugh at the sea."]
    cases = []
    for length, text_loss in [(2, [1]), (3, [2]), (4, [1, 2, 3]), (4, [3])]:
        layout = build_layout(captions[:length], tokenizer, _NUM_QUERIES, text_loss, [max(text_loss)])
        cases.append(
            Case(
                f"{length} segments ({len(layout)} tokens), text loss on segments {text_loss}",
                (layout.token_types, layout.segment, text_loss),
                expected=layout.text_target,
            )
        )
    return cases


def _mask_without_eos(token_types, segments, text_loss):
    return [kind in ("text", "boi") and segment in text_loss for kind, segment in zip(token_types, segments)]


def _mask_with_images(token_types, segments, text_loss):
    return [(kind != "bos" and segment in text_loss) or kind == "eos" for kind, segment in zip(token_types, segments)]


TEXT_LOSS_MASK = Exercise(
    name="text_loss_mask",
    notebook="04",
    title="which tokens carry next-token loss",
    signature="`text_loss_mask(token_types, segments, text_loss) -> list[bool]`",
    reference=None,  # each case carries labkit's answer: the layout's own mask
    reference_name="labkit.data.layout.build_layout(...).text_target",
    cases=_mask_cases,
    compare=lambda got, expected: compare_flags(got, expected, what="token position"),
    mistakes=(
        Mistake(
            "no loss on </s>",
            _mask_without_eos,
            "the final `</s>` is a text target in the official layout: the model learns where a story ends.",
        ),
        Mistake(
            "loss on the image slots",
            _mask_with_images,
            "image slots and `</img>` are masked (labels -100): images are trained by the regression loss.",
        ),
    ),
)

# ---- 06: what the official stage-3 adaptation trains (`SDXLAdapter.set_trainable_v2`, full_ft=False) ----------


def _trainable_reference(detokenizer: Detokenizer) -> set[str]:
    return set(detokenizer.set_trainable("official"))


def _trainable_cases() -> list[Case]:
    preset = get_preset("tiny")
    torch.manual_seed(6)
    model = Detokenizer(preset.detokenizer, preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim)
    return [Case("the tiny preset's de-tokenizer (random weights)", (model,))]


def _trainable_all_attention(detokenizer: Detokenizer) -> set[str]:
    return {
        n
        for n, _ in detokenizer.named_parameters()
        if n.startswith("resampler.") or (".attn" in n and n.startswith("unet."))
    }


def _trainable_unet_only(detokenizer: Detokenizer) -> set[str]:
    return {n for n, _ in detokenizer.named_parameters() if n.startswith("unet.") and (".to_k." in n or ".to_v." in n)}


OFFICIAL_TRAINABLE = Exercise(
    name="official_trainable",
    notebook="06",
    title="the parameters the official stage-3 adaptation trains",
    signature="`officially_trained(detokenizer) -> set of parameter names`",
    reference=_trainable_reference,
    reference_name="labkit.models.detokenizer.Detokenizer.set_trainable('official')",
    cases=_trainable_cases,
    compare=compare_names,
    mistakes=(
        Mistake(
            "every attention weight",
            _trainable_all_attention,
            "set_trainable_v2 opens only the Linear layers named to_k and to_v (keys and values), not to_q or to_out.",
        ),
        Mistake(
            "the resampler forgotten",
            _trainable_unet_only,
            "the resampler (the de-tokenizer's input side) is trained too, whole.",
        ),
    ),
)

STAGE_EXERCISES = (
    RANDOM_LENGTH_SAMPLER,
    CONTRASTIVE_LOSS,
    CLASSIFIER_FREE_GUIDANCE,
    EULER_STEP,
    COSINE_REGRESSION_LOSS,
    TEXT_LOSS_MASK,
    OFFICIAL_TRAINABLE,
)
