"""Loading the released SEED-Story weights from a local folder (the `paper` preset). Nothing downloads.

The released agent checkpoint (`pretrained/seed_story/george_sft/pytorch_model.bin`) is the state dict of the
official `ContinuousLVLM`: `llm.*` (a peft-wrapped Llama-2-7B), `input_resampler.*` and `output_resampler.*`.
It was written with peft 0.4.0, whose LoRA layers keep the frozen weight at `q_proj.weight`; current peft
nests it as `q_proj.base_layer.weight`. `map_official_keys` renames the old layout onto our modules, which
use the same attribute names (`llm`, `input_resampler`, `output_resampler`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import LabError

# What the `paper` preset reads, relative to the weights folder the user names (the official layout).
PAPER_FILES = {
    "llama": ("Llama-2-7b-hf/config.json", "Llama-2-7b-hf/tokenizer.model"),
    "agent": ("seed_story/george_sft/pytorch_model.bin",),
    "visual_tokenizer": ("visual_tokenizer/qwen_vit_G.pt",),
}
_LORA_TARGET = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(weight|bias)$")
_UNUSED = ("input_resampler.pos_embed", "output_resampler.pos_embed")  # fixed sin-cos tables we rebuild


def require_paper_weights(folder: Path | str, parts: tuple[str, ...] = tuple(PAPER_FILES)) -> dict[str, Path]:
    """Check, before any work, that every file the `paper` preset needs is there; list every missing path."""
    folder = Path(folder)
    found, missing = {}, []
    for part in parts:
        for relative in PAPER_FILES[part]:
            path = folder / relative
            (found.__setitem__(relative, path) if path.is_file() else missing.append(str(path)))
    if missing:
        listing = "\n  ".join(missing)
        raise LabError(f"the paper preset needs local weights that are missing under {folder}:\n  {listing}\n"
                       "Put Llama-2-7b-hf, the released SEED-Story checkpoints and the extracted Qwen-VL ViT there "
                       "(the official README's pretrained/ layout); nothing is downloaded.")
    return found


def map_official_keys(state: dict[str, torch.Tensor], ours: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a released agent state dict onto our model's keys; return it and the keys we could not place."""
    mapped, unplaced = {}, []
    for key, value in state.items():
        if key in _UNUSED:
            continue
        candidates = [key]
        if _LORA_TARGET.search(key) and ".lora_" not in key:  # peft 0.4: frozen weight beside lora_A/lora_B
            candidates.append(_LORA_TARGET.sub(lambda m: f".{m.group(1)}.base_layer.{m.group(2)}", key))
        target = next((c for c in candidates if c in ours), None)
        if target is None:
            unplaced.append(key)
        else:
            mapped[target] = value
    return mapped, unplaced


def load_official_agent(model: torch.nn.Module, path: Path | str) -> dict[str, list[str]]:
    """Load a released agent checkpoint into a `SeedStoryMLLM`; report what stayed missing or unused."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"{path}: released agent checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    mapped, unplaced = map_official_keys(state, set(ours))
    missing = sorted(set(ours) - set(mapped))
    model.load_state_dict(mapped, strict=False)
    return {"missing": missing, "unexpected": unplaced}
