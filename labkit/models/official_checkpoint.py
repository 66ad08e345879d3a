"""Loading the released SEED-Story weights from a local folder (the `paper` preset). Nothing downloads.

The released de-tokenizers (`SDXLAdapter` state dicts: `resampler.*` with the official `ResamplerXLV2` names,
which ours keeps, and `unet.*`) load onto SDXL base with `load_official_detokenizer`.

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

from labkit.core.errors import LabError
from labkit.core.presets import get_preset
from labkit.models.detokenizer import Detokenizer

# What the `paper` preset reads, relative to the weights folder the user names (the official layout).
PAPER_FILES = {
    "llama": ("Llama-2-7b-hf/config.json", "Llama-2-7b-hf/tokenizer.model"),
    "agent": ("seed_story/george_sft/pytorch_model.bin",),
    "visual_tokenizer": ("visual_tokenizer/qwen_vit_G.pt",),
    # SDXL base 1.0 as the Hugging Face repo lays it out, and the released de-tokenizers
    # (configs/detokenizer/detokenizer_sdxl_qwen_vit_{pretrained,adapted}.yaml)
    "sdxl": (
        "stable-diffusion-xl-base-1.0/unet/config.json",
        "stable-diffusion-xl-base-1.0/vae/config.json",
        "stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json",
    ),
    "detokenizer_pretrained": ("detokenizer/detokenizer_pretrained/checkpoint-55000/pytorch_model.bin",),
    "detokenizer_adapted": ("detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin",),
}
SDXL = "stable-diffusion-xl-base-1.0"
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
        raise LabError(
            f"the paper preset needs local weights that are missing under {folder}:\n  {listing}\n"
            "Put Llama-2-7b-hf, the released SEED-Story checkpoints and the extracted Qwen-VL ViT there "
            "(the official README's pretrained/ layout); nothing is downloaded."
        )
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
    state = _read_state(path)
    ours = model.state_dict()
    mapped, unplaced = map_official_keys(state, set(ours))
    missing = sorted(set(ours) - set(mapped))
    model.load_state_dict(mapped, strict=False)
    return {"missing": missing, "unexpected": unplaced}


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_official_detokenizer(folder: Path | str, which: str = "adapted", dtype: torch.dtype = torch.bfloat16):
    """SDXL base (unet/, vae/, scheduler/ from `<folder>/stable-diffusion-xl-base-1.0`) + a released de-tokenizer
    (`pretrained` = stage 1, `adapted` = stage 3 on George). Every missing file is listed before any loading.

    Returns (detokenizer, report) where report lists the released keys we could not place and ours left unset.
    The guidance negative (ViT features of a blank 448 px image) is left for the caller to set from Qwen-VL's ViT.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    if which not in ("pretrained", "adapted"):
        raise LabError(f"which: 'pretrained' or 'adapted' (got {which!r})")
    folder = Path(folder)
    found = require_paper_weights(folder, ("sdxl", f"detokenizer_{which}"))
    sdxl = folder / SDXL
    unet = UNet2DConditionModel.from_pretrained(sdxl / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(sdxl / "vae", torch_dtype=dtype)
    preset = get_preset("paper")
    model = Detokenizer(
        preset.detokenizer,
        preset.visual_tokenizer.num_features,
        preset.visual_tokenizer.feature_dim,
        preset="paper",
        unet=unet,
        vae=vae,
    )
    model.sample_scheduler = EulerDiscreteScheduler.from_pretrained(sdxl / "scheduler")
    model.resampler.to(dtype)
    state = _read_state(found[PAPER_FILES[f"detokenizer_{which}"][0]])
    ours = model.state_dict()
    mapped = {k: v for k, v in state.items() if k in ours and k.startswith(("resampler.", "unet."))}
    model.load_state_dict(mapped, strict=False)
    missing = sorted(k for k in ours if k.startswith("resampler.") and k not in mapped)
    return model.eval(), {
        "unexpected": sorted(set(state) - set(mapped)),
        "missing_resampler": missing,
        "unet_keys_loaded": sum(k.startswith("unet.") for k in mapped),
    }
