"""`labkit info`: parameter counts per component, built on the `meta` device (no weights, no memory).

For `paper` this is the published architecture: Llama-2-7B (6.74 B) with the vocabulary resized to 32066,
LoRA r=16 on the seven projections, the two Qwen-VL resamplers, Qwen-VL's ViT-bigG visual tokenizer, and the
de-tokenizer: `ResamplerXLV2` + SDXL base's UNet (2.57 B) and VAE.
"""

from __future__ import annotations

import torch

from labkit.core.presets import get_preset
from labkit.models.mllm import SeedStoryMLLM, paper_vocab_size, parameter_counts
from labkit.training.memory_plan import STAGE3_MODES, format_table, memory_table, stage3_memory_table


def nominal_vocab_size(preset_name: str) -> int:
    """The vocabulary the preset's model is built with when no tokenizer is at hand.

    `paper`: Llama-2's 32000 + 66 image tokens. Smaller presets: the upper bound of the BPE tokenizer
    (256 bytes + 7 special tokens + image tokens + merges); a trained tokenizer may have fewer merges.
    """
    preset = get_preset(preset_name)
    if preset.mllm.llm.base_vocab:
        return paper_vocab_size(preset)
    return 256 + 7 + preset.data.image_tokens + preset.data.bpe_merges


def image_features(preset) -> tuple[int, int]:
    return preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim


def model_info(preset_name: str) -> dict:
    from labkit.models.detokenizer import Detokenizer
    from labkit.models.detokenizer import parameter_counts as detokenizer_counts
    from labkit.models.visual_tokenizer import VisualTokenizer

    preset = get_preset(preset_name)
    vocab = nominal_vocab_size(preset_name)
    with torch.device("meta"):
        mllm = SeedStoryMLLM(preset, vocab)
        tokenizer = VisualTokenizer(preset.visual_tokenizer)
        detokenizer = Detokenizer(preset.detokenizer, *image_features(preset), preset=preset.name)
    counts = parameter_counts(mllm)
    vit = sum(p.numel() for p in tokenizer.parameters())
    counts["visual_tokenizer"] = {"total": vit, "trainable": 0 if preset.pretrained_weights else vit}
    counts.update(detokenizer_counts(detokenizer))  # trainable: what stage 1 trains (resampler + UNet)
    return {
        "preset": preset.name,
        "vocab_size": vocab,
        "image_slots": preset.mllm.num_queries,
        "features": [preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim],
        "lora": None
        if preset.mllm.lora is None
        else {
            "r": preset.mllm.lora.r,
            "alpha": preset.mllm.lora.alpha,
            "dropout": preset.mllm.lora.dropout,
            "targets": list(preset.mllm.lora.targets),
        },
        "detokenizer": {
            "image_size": preset.detokenizer.image_size,
            "conditioning_tokens": preset.detokenizer.resampler_queries,
            "cross_attention_dim": sum(preset.detokenizer.cross_widths),
        },
        "parameters": counts,
        # stage 2's memory per GPU under each configs/accelerate/ config (LoRA presets: the paper's multi-GPU run)
        "memory_per_gpu_gib": None if preset.mllm.lora is None else memory_table(preset, vocab),
        # stage 3's (labkit.training.stage3_paper): presets whose de-tokenizer starts from SDXL base
        "stage3_memory_per_gpu_gib": {mode: stage3_memory_table(preset, mode) for mode in STAGE3_MODES}
        if preset.pretrained_weights
        else None,
    }


def format_info(info: dict) -> str:
    lines = [
        f"preset {info['preset']}: vocabulary {info['vocab_size']}, {info['image_slots']} image slots, "
        f"features {info['features'][0]}x{info['features'][1]}",
        "",
        f"{'component':<22} {'total':>15} {'trainable':>15}",
    ]
    for name, count in info["parameters"].items():
        lines.append(f"{name:<22} {count['total']:>15,} {count['trainable']:>15,}")
    if info.get("memory_per_gpu_gib"):
        lines += ["", "stage 2, GiB per GPU (labkit.training.memory_plan: 240 samples x 1280 tokens per step):"]
        lines.append(format_table(info["memory_per_gpu_gib"]))
    for mode, rows in (info.get("stage3_memory_per_gpu_gib") or {}).items():
        lines += ["", f"stage 3 --mode {mode}, GiB per GPU (128 samples at 1024 px per step, gradient checkpointing):"]
        lines.append(format_table(rows))
    return "\n".join(lines)
