"""`labkit bench`: speed targets measured as ratios, side by side in one run (DESIGN §8).

Benchmarks are not tests: they print figures for `BENCHMARKS.md`, with the machine and the command.
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from typing import Callable

import torch
from transformers import LlamaForCausalLM

from .data.layout import build_layout
from .data.sampler import random_length_sample
from .data.text_tokenizer import StoryTokenizer
from .mllm import MLLMBatch, SeedStoryMLLM, collate, llm_config
from .presets import get_preset


def _story_batch(tokenizer: StoryTokenizer, preset, captions: list[list[str]], batch_size: int, seed: int) -> MLLMBatch:
    rng = random.Random(seed)
    layouts, features = [], []
    n, d = preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim
    for _ in range(batch_size):
        chunk = captions[rng.randrange(len(captions))][:10]
        sample = random_length_sample(chunk, list(range(len(chunk))), rng)
        layouts.append(build_layout(sample.captions, tokenizer, preset.mllm.num_queries, sample.text_loss, sample.image_loss))
        features.append(torch.randn(len(sample.captions), n, d, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))))
    return collate(layouts, features, tokenizer.pad_id)


def _timed_steps(step: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def stage2_step_ratio(preset_name: str = "tiny", batch_size: int = 12, repeats: int = 15, seed: int = 0,
                      data_root: str | None = None) -> dict:
    """Median time of one stage-2 training step vs one plain `LlamaForCausalLM` step on the same tokens.

    Both models get the same Llama config and the same padded token batch; the plain model sees the
    image slots as ordinary tokens (no resamplers, no regression). Steps alternate so that load on the
    machine hits both alike. Target: ratio <= 1.25.
    """
    from .data.storystream_mini import load_tokenizer, open_split
    from .report import project_root

    preset = get_preset(preset_name)
    root = data_root or project_root() / "data_samples" / "storystream-mini"
    tokenizer = load_tokenizer(root)
    captions = [list(r.captions) for r in open_split(root, "train").records]
    batch = _story_batch(tokenizer, preset, captions, batch_size, seed)
    torch.manual_seed(seed)
    mllm = SeedStoryMLLM(preset, tokenizer.vocab_size)
    plain = LlamaForCausalLM(llm_config(preset, tokenizer.vocab_size))
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in (("mllm", mllm), ("plain", plain))}

    def mllm_step() -> None:
        loss = mllm(batch).loss
        optimizers["mllm"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["mllm"].step()

    def plain_step() -> None:
        loss = plain(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
        optimizers["plain"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["plain"].step()

    for warm in (mllm_step, plain_step, mllm_step, plain_step):
        warm()
    times = {"mllm": [], "plain": []}
    for _ in range(repeats):
        times["mllm"] += _timed_steps(mllm_step, 1)
        times["plain"] += _timed_steps(plain_step, 1)
    mllm_median, plain_median = statistics.median(times["mllm"]), statistics.median(times["plain"])
    return {
        "benchmark": "stage2-step", "preset": preset_name, "batch_size": batch_size, "tokens": batch.tokens,
        "repeats": repeats, "mllm_seconds": round(mllm_median, 4), "plain_llama_seconds": round(plain_median, 4),
        "ratio": round(mllm_median / plain_median, 3), "target": "<= 1.25",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
