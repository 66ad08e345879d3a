"""Stage 2: story instruction tuning of the MLLM (paper §3.2; official `src/train/train_clm_sft.py`).

Training samples come from 10-frame chunks of the training stories (`chunk_data.py`), each drawn with the
official random-length sampler (or the all-segments variant), laid out as the official
`decode_long_story_data` and scored with CE + cosine regression to the frozen visual tokenizer's features.

Differences from the official run, all forced by scale: the tiny LLM trains from scratch (no Llama-2 or
SEED-X initialisation), with a higher learning rate (1e-3 instead of 1e-4) and far fewer steps.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from labkit.core.artifacts import checked_manifest, config_hash, load_artifact, save_artifact
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import weights_folder
from labkit.core.presets import Preset
from labkit.data.frames import load_frames
from labkit.data.layout import build_layout
from labkit.data.sampler import SAMPLERS, make_sample
from labkit.data.storystream_mini import load_tokenizer
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.inference.attention import sink_summary
from labkit.models.mllm import MLLMBatch, SeedStoryMLLM, collate
from labkit.models.official_checkpoint import require_paper_weights
from labkit.training.common import StageRun, base_manifest, prepare_workdir
from labkit.training.loop import Schedule
from labkit.training.stage0 import features_for_split

NAME = "mllm"
TOKENIZER = "tokenizer"  # the text tokenizer the MLLM was trained with travels inside its artifact
SCHEDULES = {
    "quick": Schedule(steps=250, batch_size=12, lr=1e-3, warmup=20, checkpoint_every=50, eval_every=125),
    "reference": Schedule(steps=3000, batch_size=12, lr=1e-3, warmup=100, checkpoint_every=250, eval_every=250),
}
VALIDATION_SAMPLES = 48
SEED = 2


@dataclass
class StoryChunks:
    """Training or validation chunks: captions [C][L] and visual-tokenizer features [C, L, N, D]."""

    captions: list[list[str]]
    features: torch.Tensor

    @classmethod
    def from_split(cls, captions: list[list[str]], features: torch.Tensor, length: int) -> "StoryChunks":
        """Cut [S, F, N, D] stories into non-overlapping `length`-frame chunks, dropping incomplete tails."""
        chunk_captions, chunk_features = [], []
        for story, story_captions in enumerate(captions):
            for start in range(0, len(story_captions) - length + 1, length):
                chunk_captions.append(story_captions[start : start + length])
                chunk_features.append(features[story, start : start + length])
        return cls(chunk_captions, torch.stack(chunk_features))


def mllm_config_hash(preset: Preset, vocab_size: int) -> str:
    """What the MLLM's weights depend on: its sizes, the feature sizes it reads, the vocabulary."""
    return config_hash(
        {
            "mllm": asdict(preset.mllm),
            "features": [preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim],
            "vocab_size": vocab_size,
        }
    )


def make_batch_fn(chunks: StoryChunks, tokenizer: StoryTokenizer, preset: Preset, sampler: str, seed: int):
    """`make_batch(step, rows)`: a pure function of (seed, step, row), so interrupted runs resume exactly."""

    def make_batch(step: int, rows: range) -> MLLMBatch:
        layouts, features = [], []
        for row in rows:
            rng = random.Random(f"{seed}/{step}/{row}")  # str seeds hash with SHA-512: stable across runs
            chunk = rng.randrange(len(chunks.captions))
            sample = make_sample(sampler, chunks.captions[chunk], list(range(len(chunks.captions[chunk]))), rng)
            layouts.append(
                build_layout(sample.captions, tokenizer, preset.mllm.num_queries, sample.text_loss, sample.image_loss)
            )
            features.append(chunks.features[chunk, : len(sample.captions)])
        return collate(layouts, features, tokenizer.pad_id)

    return make_batch


def validation_batches(
    chunks: StoryChunks,
    tokenizer: StoryTokenizer,
    preset: Preset,
    samples: int = VALIDATION_SAMPLES,
    batch_size: int = 16,
) -> list[MLLMBatch]:
    """A fixed set of random-length validation samples (the same for every run and every step)."""
    rng = random.Random(1234)
    layouts, features = [], []
    for index in range(samples):
        chunk = index % len(chunks.captions)
        sample = make_sample("random-length", chunks.captions[chunk], list(range(len(chunks.captions[chunk]))), rng)
        layouts.append(
            build_layout(sample.captions, tokenizer, preset.mllm.num_queries, sample.text_loss, sample.image_loss)
        )
        features.append(chunks.features[chunk, : len(sample.captions)])
    return [
        collate(layouts[i : i + batch_size], features[i : i + batch_size], tokenizer.pad_id)
        for i in range(0, samples, batch_size)
    ]


def evaluate(
    model: SeedStoryMLLM, batches: list[MLLMBatch], tokenizer: StoryTokenizer | None = None
) -> dict[str, float]:
    """Validation CE on the target caption tokens and cosine error (1 - cos) of the regressed features; with
    the tokenizer, also the attention-sink ratios on the first batch (for the sink-emergence curves)."""
    device = next(model.parameters()).device
    ce, cos, tokens, images = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            out = model(batch.to(device))
            n_tokens = int((batch.labels[:, 1:] != -100).sum())
            n_images = batch.target_features.shape[0]
            ce += float(out.lm_loss) * n_tokens
            cos += float(out.rec_loss) * n_images
            tokens, images = tokens + n_tokens, images + n_images
    metrics = {"val_ce": ce / max(tokens, 1), "val_cosine_error": cos / max(images, 1)}
    if tokenizer is not None:
        metrics.update(sink_summary(model, batches[0].to(device), tokenizer))
    return metrics


def build_model(preset: Preset, tokenizer: StoryTokenizer, seed: int = SEED) -> SeedStoryMLLM:
    torch.manual_seed(seed)
    return SeedStoryMLLM(preset, tokenizer.vocab_size)


def load_mllm(folder: Path | str, preset: Preset) -> tuple[SeedStoryMLLM, StoryTokenizer, dict]:
    """A trained MLLM artifact with the text tokenizer it was trained with; refused if made for another
    preset or other sizes."""
    checked_manifest(folder, NAME, preset.name)  # a missing manifest or damaged weights: the clearest thing to report
    tokenizer = StoryTokenizer.from_pretrained(Path(folder) / TOKENIZER)
    state, manifest = load_artifact(folder, NAME, preset.name, mllm_config_hash(preset, tokenizer.vocab_size))
    model = SeedStoryMLLM(preset, tokenizer.vocab_size)
    model.load_state_dict(state)
    return model.eval(), tokenizer, manifest


def train_stage2(run: StageRun, sampler: str = "random-length", seed: int = SEED) -> dict:
    """Train the MLLM on frozen visual-tokenizer features; write its artifact; return the manifest."""
    config, schedule, resume, stop_after = run.preset, run.schedule, run.resume, run.stop_after
    if config.mllm.lora is not None:  # the paper preset: real Llama-2-7B weights, checked before any work
        require_paper_weights(weights_folder(), ("llama", "visual_tokenizer"))
        raise LabError(
            "stage 2 at the paper preset needs multi-GPU training that this lab does not run yet; "
            "`labkit info --preset paper` shows its architecture, and the small preset trains on one GPU"
        )
    if sampler not in SAMPLERS:
        raise ParameterError("--sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    plan = run.plan(SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(NAME)
    prepare_workdir(
        workdir,
        {
            "stage": NAME,
            "preset": config.name,
            "plan": asdict(plan),
            "sampler": sampler,
            "seed": seed,
            "data": str(data_root),
        },
        resume,
    )
    start = time.perf_counter()
    tokenizer = load_tokenizer(data_root)
    chunk_length = config.data.chunk_length
    train_chunks = StoryChunks.from_split(
        load_frames(data_root, "train").captions, features_for_split(config, "train", data_root), chunk_length
    )
    val_chunks = StoryChunks.from_split(
        load_frames(data_root, "val").captions, features_for_split(config, "val", data_root), chunk_length
    )
    model = build_model(config, tokenizer, seed)
    batches = validation_batches(val_chunks, tokenizer, config)
    initial = evaluate(model.eval(), batches, tokenizer)
    result = run.fit(
        model,
        make_batch_fn(train_chunks, tokenizer, config, sampler, seed),
        lambda m, b: _loss(m, b),
        plan,
        workdir,
        evaluate=lambda m: evaluate(m, batches, tokenizer),
        desc=f"stage 2 ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after}
    final = evaluate(model.eval(), batches, tokenizer)
    manifest = {
        "stage": "stage2",
        "name": NAME,
        **base_manifest(run, NAME, plan, seed, data_root),
        "sampler": sampler,
        "config_hash": mllm_config_hash(config, tokenizer.vocab_size),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "vocab_size": tokenizer.vocab_size,
        "metrics": {"step0": initial, "final": final},
        "history": _thin(result.history),
    }
    if result.is_main_process:
        save_artifact(
            out,
            model.state_dict(),
            manifest,
            half=schedule == "reference",
            extra=lambda folder: tokenizer.save_pretrained(folder / TOKENIZER),
        )
    return manifest


def _thin(history: list[dict], points: int = 100) -> list[dict]:
    """About `points` training-loss entries for the manifest, and every evaluation entry."""
    stride = max(1, len(history) // points)
    kept = [h for i, h in enumerate(history) if i % stride == 0 or "val_ce" in h or i == len(history) - 1]
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in kept]


def _loss(model: SeedStoryMLLM, batch: MLLMBatch) -> tuple[torch.Tensor, dict]:
    out = model(batch.to(next(model.parameters()).device))
    return out.loss, {"lm_loss": out.lm_loss.detach(), "rec_loss": out.rec_loss.detach()}
