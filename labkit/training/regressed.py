"""The frozen MLLM's regressed features of every (story chunk, target frame) pair: what stage 3 adapts the
de-tokenizer to (paper §3.3; official `src/train/train_sdxl_img2img_llm.py` runs the frozen agent on every batch,
`return_recon_image_embeds=True`). The MLLM is frozen, so they are computed once per split and cached.

Shared by stage 3 at every preset (`labkit.training.stage3`, `labkit.training.stage3_paper`), the notebooks and the
de-tokenizer playground. At the paper preset the MLLM is the stage-2 LoRA artifact, whose frozen Llama body
`load_mllm` reads from the weights folder again.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit.core.artifacts import require, weights_hash
from labkit.core.atomic import save_torch
from labkit.core.devices import default_device, module_device
from labkit.core.paths import artifacts_folder
from labkit.core.presets import Preset
from labkit.data.frames import load_frames
from labkit.data.layout import build_layout
from labkit.models.mllm import collate
from labkit.training.detokenizer_eval import EvalFrames
from labkit.training.stage0 import features_for_split
from labkit.training.stage2 import NAME as MLLM
from labkit.training.stage2 import load_mllm


@dataclass
class RegressedPairs:
    """The frozen MLLM's regressed features of each (chunk, target frame) pair of a split, with where the
    target frame sits: `story`, `frame` index into the split's [S, F] frames."""

    features: torch.Tensor  # [P, N, D]
    story: torch.Tensor  # [P]
    frame: torch.Tensor  # [P]

    def subset(self, index: torch.Tensor | slice) -> "RegressedPairs":
        return RegressedPairs(self.features[index], self.story[index], self.frame[index])

    def truth(self, data_root: Path | str, split: str) -> EvalFrames:
        frames = load_frames(data_root, split)
        return EvalFrames(
            frames.images[self.story, self.frame],
            frames.protagonist[self.story, self.frame],
            frames.style[self.story, self.frame],
        )


@torch.no_grad()
def compute_regressed(
    model,
    tokenizer,
    captions: list[list[str]],
    features: torch.Tensor,
    chunk_length: int,
    batch_size: int = 32,
    progress: bool = False,
) -> RegressedPairs:
    """For every chunk and every target j = 1..L-1: the random-length sample of segments 0..j (official
    `decode_long_story_data`), through the MLLM; the output resampler's features for image j."""
    jobs = [
        (story, start, j)
        for story in range(len(captions))
        for start in range(0, len(captions[story]) - chunk_length + 1, chunk_length)
        for j in range(1, chunk_length)
    ]
    jobs.sort(key=lambda job: job[2])  # similar lengths batch together: less padding
    out = []
    for begin in tqdm(range(0, len(jobs), batch_size), desc="regressed features", disable=not progress):
        layouts, inputs = [], []
        for story, start, j in jobs[begin : begin + batch_size]:
            segment = captions[story][start : start + j + 1]
            layouts.append(build_layout(segment, tokenizer, model.num_queries, (j,), (j,)))
            inputs.append(features[story, start : start + j + 1])
        batch = collate(layouts, inputs, tokenizer.pad_id).to(module_device(model))
        out.append(model(batch).regressed.float().cpu())
    return RegressedPairs(
        torch.cat(out), torch.tensor([s for s, _, _ in jobs]), torch.tensor([s + j for _, s, j in jobs])
    )


def regressed_pairs(
    preset: Preset, split: str, data_root: Path | str, progress: bool = True, mllm: Path | str | None = None
) -> RegressedPairs:
    """`compute_regressed` for a split with the preset's MLLM (`mllm`: an artifact folder, default the one
    `require` finds), cached under artifacts/<preset>/features/regressed/ keyed by its weights and the split file."""
    folder = Path(mllm) if mllm is not None else require(MLLM, preset.name)
    source = Path(data_root) / f"{split}.jsonl"
    weights = weights_hash(folder)
    adapter = folder / "llm" / "adapter_model.safetensors"  # a LoRA artifact's adapter is outside model.safetensors
    if adapter.is_file():
        weights += "|" + hashlib.sha256(adapter.read_bytes()).hexdigest()[:16]
    key = hashlib.sha256(
        f"{weights}|{Path(data_root).resolve()}|{split}|{source.stat().st_size}|{source.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    cache = artifacts_folder(preset.name) / "features" / "regressed" / f"{split}-{key}.pt"
    if cache.is_file():
        return RegressedPairs(**torch.load(cache, weights_only=True))
    model, tokenizer, _ = load_mllm(folder, preset)
    model.to(default_device())  # every training pair goes through the MLLM once: on the GPU when there is one
    pairs = compute_regressed(
        model,
        tokenizer,
        load_frames(data_root, split).captions,
        features_for_split(preset, split, data_root, progress),
        preset.data.chunk_length,
        progress=progress,
    )
    save_torch(asdict(pairs), cache)
    return pairs
