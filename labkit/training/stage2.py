"""Stage 2: story instruction tuning of the MLLM (paper §3.2; official `src/train/train_clm_sft.py`).

Training samples come from 10-frame chunks of the training stories (`chunk_data.py`), each drawn with the
official random-length sampler (or the all-segments variant), laid out as the official
`decode_long_story_data` and scored with CE + cosine regression to the frozen visual tokenizer's features.

The LLM starts from the lab's pre-trained language model (`labkit train lm`, `labkit.training.lm`), as the
paper's starts from pretrained Llama-2-7B (§3.2). Differences from the official run, all forced by scale: at
`tiny` the whole LLM is fine-tuned (no LoRA; the official run trains LoRA r=16 on Llama-2 with SEED-X's
weights), with a higher learning rate (1e-3 instead of 1e-4) and far fewer steps.

The artifact holds the resamplers in `model.safetensors` and the language model as a plain transformers folder,
`llm/` (`config.json`, `model.safetensors`, `tokenizer.json`): `LlamaForCausalLM.from_pretrained(<mllm>/llm)`.

At the `paper` preset the same function trains LoRA on the frozen Llama-2-7B read from the weights folder, with
Llama-2's tokenizer and the official schedule (`labkit.training.stage2_lora`); its `llm/` is a peft adapter.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from labkit.core.artifacts import (
    WEIGHTS,
    checked_manifest,
    config_hash,
    load_artifact,
    require,
    save_artifact,
)
from labkit.core.errors import ParameterError
from labkit.core.paths import portable_path, weights_folder
from labkit.core.presets import Preset
from labkit.data.frames import load_frames
from labkit.data.layout import build_layout
from labkit.data.sampler import SAMPLERS, make_sample
from labkit.data.storystream_mini import load_tokenizer, open_split
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.inference.attention import SINK_SKIP, multimodal_bos_ratios, plain_bos_ratios, sink_summary
from labkit.models.mllm import MLLMBatch, SeedStoryMLLM, collate
from labkit.training import stage2_lora
from labkit.training.common import StageRun, base_manifest, prepare_workdir
from labkit.training.lm import caption_probe, load_lm
from labkit.training.loop import Schedule
from labkit.training.sharding import full_parameters, full_state_dict, refuse_unsupported_fsdp
from labkit.training.stage0 import features_for_split

NAME = "mllm"
TOKENIZER = "tokenizer"  # the text tokenizer the MLLM was trained with travels inside its artifact
LLM = "llm"  # the language model, as a transformers folder inside the MLLM's artifact
SCHEDULES = {
    "quick": Schedule(steps=250, batch_size=12, lr=1e-3, warmup=20, checkpoint_every=50, eval_every=125),
    # 1,500 steps, not the 3,000 that trained the from-scratch MLLM: measured, an MLLM that starts from the
    # pre-trained LM reaches a lower validation CE in 1,000 steps than the from-scratch one did in 3,000 (issue 13)
    "reference": Schedule(steps=1500, batch_size=12, lr=1e-3, warmup=100, checkpoint_every=250, eval_every=250),
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
            "language_model": "pre-trained, in llm/",  # the artifact layout since stage 2 starts from `labkit train lm`
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
    preset or other sizes. A LoRA artifact (the paper preset) reads its frozen body from the weights folder."""
    checked_manifest(folder, NAME, preset.name)  # a missing manifest or damaged weights: the clearest thing to report
    if preset.mllm.lora is not None:
        tokenizer = stage2_lora.load_tokenizer_files(Path(folder) / TOKENIZER)
        state, manifest = load_artifact(folder, NAME, preset.name, mllm_config_hash(preset, tokenizer.vocab_size))
        model = stage2_lora.load_lora_mllm(Path(folder), preset, tokenizer, weights_folder())
        model.load_state_dict(state, strict=False)  # the resamplers; the LLM's tensors came from the adapter
        return model.eval(), tokenizer, manifest
    tokenizer = StoryTokenizer.from_pretrained(Path(folder) / TOKENIZER)
    state, manifest = load_artifact(folder, NAME, preset.name, mllm_config_hash(preset, tokenizer.vocab_size))
    llm_state = load_file(str(Path(folder) / LLM / WEIGHTS))
    state.update({f"llm.{key}": value.float() for key, value in llm_state.items()})
    model = SeedStoryMLLM(preset, tokenizer.vocab_size)
    model.load_state_dict(state)
    return model.eval(), tokenizer, manifest


def start_from_lm(model: SeedStoryMLLM, preset: Preset, tokenizer: StoryTokenizer, lm_folder: Path | str) -> dict:
    """Copy the pre-trained language model into the MLLM (the paper starts from Llama-2-7B, §3.2); its manifest.

    A data set whose text tokenizer differs from the LM's (the committed 8-story sample in `data_samples/` trained
    its own BPE) gets the LM's body as it is and the embedding and output rows of every token the two vocabularies
    share, matched by the token's text; the others keep their fresh initialisation. `manifest["vocabulary"]` says
    how many rows were carried over."""
    lm, lm_tokenizer, manifest = load_lm(lm_folder, preset)
    state = lm.state_dict()
    if lm_tokenizer.tokenizer.to_str() != tokenizer.tokenizer.to_str():
        state = _transplant_vocabulary(state, model.causal_lm.state_dict(), lm_tokenizer, tokenizer)
        shared = int(state.pop("_shared_rows"))
    else:
        shared = tokenizer.vocab_size
    model.causal_lm.load_state_dict(state)
    return {**manifest, "vocabulary": {"rows": tokenizer.vocab_size, "from_lm": shared}}


def _transplant_vocabulary(state: dict, fresh: dict, source: StoryTokenizer, target: StoryTokenizer) -> dict:
    """`state` (the LM's) with its vocabulary-sized rows re-indexed to `target`'s ids by token text."""
    source_ids = source.tokenizer.get_vocab()
    pairs = [(new, source_ids[text]) for text, new in target.tokenizer.get_vocab().items() if text in source_ids]
    rows = {"model.embed_tokens.weight", "lm_head.weight"}
    out = {key: value for key, value in state.items() if key not in rows}
    for key in rows:
        table = fresh[key].clone()
        new, old = zip(*pairs)
        table[list(new)] = state[key][list(old)]
        out[key] = table
    out["_shared_rows"] = torch.tensor(len(pairs))
    return out


def save_llm_folder(model: SeedStoryMLLM, tokenizer: StoryTokenizer, folder: Path, half: bool) -> None:
    """The MLLM's language model as a transformers folder that `LlamaForCausalLM.from_pretrained` reads."""
    llm = model.causal_lm
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if half else v).contiguous() for k, v in llm.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    llm.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train_stage2(
    run: StageRun, sampler: str = "random-length", seed: int = SEED, lm_folder: Path | str | None = None
) -> dict:
    """Train the MLLM on frozen visual-tokenizer features, starting from the pre-trained LM (`lm_folder`, default
    the `lm` artifact); write its artifact; return the manifest."""
    config, schedule, resume, stop_after = run.preset, run.schedule, run.resume, run.stop_after
    lora = config.mllm.lora is not None  # the paper preset: LoRA on the Llama-2-7B of the weights folder
    refuse_unsupported_fsdp("stage 2" + ("" if lora else f" at the {config.name} preset"), supported=lora)
    if lora:
        weights = weights_folder()
        stage2_lora.require_lora_weights(weights)  # before any work
    if sampler not in SAMPLERS:
        raise ParameterError("--sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    plan = run.plan(stage2_lora.SCHEDULES if lora else SCHEDULES)
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
    tokenizer = stage2_lora.lora_tokenizer(weights) if lora else load_tokenizer(data_root)
    chunk_length = config.data.chunk_length
    # at the paper preset the main process runs the ViT over the frames once and the others read its feature cache
    with stage2_lora.process_state(run.torch_device()).main_process_first() if lora else nullcontext():
        train_chunks = StoryChunks.from_split(
            load_frames(data_root, "train").captions, features_for_split(config, "train", data_root), chunk_length
        )
        val_chunks = StoryChunks.from_split(
            load_frames(data_root, "val").captions, features_for_split(config, "val", data_root), chunk_length
        )
    if lora:
        device = stage2_lora.process_state(run.torch_device()).device
        model = stage2_lora.build_lora_mllm(config, tokenizer, weights, seed, device)
        lm_folder, lm_manifest = weights / stage2_lora.LLAMA, {}
    else:
        model = build_model(config, tokenizer, seed)
        lm_folder = Path(lm_folder) if lm_folder is not None else require("lm", config.name)
        lm_manifest = start_from_lm(model, config, tokenizer, lm_folder)
    batches = validation_batches(val_chunks, tokenizer, config)
    # the attention-sink probes label `[INST]` by its one id: the lab's BPE tokenizer, not Llama-2's
    sinks = tokenizer if isinstance(tokenizer, StoryTokenizer) else None
    initial = evaluate(model.eval(), batches, sinks)
    result = run.fit(
        model,
        make_batch_fn(train_chunks, tokenizer, config, sampler, seed),
        lambda m, b: _loss(m, b),
        plan,
        workdir,
        evaluate=lambda m: evaluate(m, batches, sinks),
        desc=f"stage 2 ({schedule})",
        shardable=lora,  # the paper preset's LoRA run gathers FSDP's shards below
    )
    replicas = stage2_lora.replica_digests(model) if lora else None  # every process, before any return
    if run.interrupted(plan):
        return {"interrupted_at": stop_after, **({"replica_digests": replicas} if lora else {})}
    with full_parameters(model):  # under FSDP (the paper preset) each process gathers the whole model here
        final = evaluate(model.eval(), batches, sinks)
        val_captions = [list(record.captions) for record in open_split(data_root, "val").records]
        captions = caption_probe(tokenizer, val_captions)
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
            "language_model": {
                "folder": portable_path(lm_folder),
                "config_hash": lm_manifest.get("config_hash"),
                "schedule": lm_manifest.get("schedule"),
                "corpus": lm_manifest.get("corpus"),
            },
            # the BOS sink per layer before stage 2 (the LM's manifest) and after it, on validation captions as plain
            # text after `<s>` (the same probe), and on the multimodal validation samples
            "bos_ratio": {
                "skip": SINK_SKIP,
                "captions_before_stage2": lm_manifest.get("bos_ratio", {}).get("captions"),
                "captions_after_stage2": plain_bos_ratios(model.causal_lm, captions, tokenizer.pad_id),
                "multimodal_after_stage2": multimodal_bos_ratios(model, batches[0], sinks) if sinks else None,
            },
            "history": _thin(result.history),
        }
    if lora:  # one digest per data-parallel process: they must be equal (tests/training/test_accelerate_paper_lora.py)
        manifest["replica_digests"] = replicas

    def extra_files(folder: Path) -> None:
        if lora:  # the tokenizer's two source files and the peft adapter, never the 7B body
            stage2_lora.save_tokenizer_files(weights, folder / TOKENIZER)
            stage2_lora.save_lora_llm(model, folder / LLM, state)
            return
        tokenizer.save_pretrained(folder / TOKENIZER)
        save_llm_folder(model, tokenizer, folder / LLM, half=schedule == "reference")

    state = full_state_dict(model) if lora else model.state_dict()  # gathered shards under FSDP: every process
    if result.is_main_process:
        resamplers = {k: v for k, v in state.items() if not k.startswith("llm.")}
        save_artifact(out, resamplers, manifest, half=schedule == "reference", extra=extra_files)
    return manifest


def _thin(history: list[dict], points: int = 100) -> list[dict]:
    """About `points` training-loss entries for the manifest, and every evaluation entry."""
    stride = max(1, len(history) // points)
    kept = [h for i, h in enumerate(history) if i % stride == 0 or "val_ce" in h or i == len(history) - 1]
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in kept]


def _loss(model: SeedStoryMLLM, batch: MLLMBatch) -> tuple[torch.Tensor, dict]:
    out = model(batch.to(next(model.parameters()).device))
    return out.loss, {"lm_loss": out.lm_loss.detach(), "rec_loss": out.rec_loss.detach()}
