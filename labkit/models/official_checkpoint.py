"""Loading the released SEED-Story weights from a local folder (the `paper` preset). Nothing downloads.

The released de-tokenizers (`SDXLAdapter` state dicts: `resampler.*` with the official `ResamplerXLV2` names,
which ours keeps, and `unet.*`) load onto SDXL base with `load_official_detokenizer`.

The released agent checkpoint (`pretrained/seed_story/george_sft/pytorch_model.bin`) is the state dict of the
official `ContinuousLVLM`: `llm.*` (a peft-wrapped Llama-2-7B), `input_resampler.*` and `output_resampler.*`.
It was written with peft 0.4.0, whose LoRA layers keep the frozen weight at `q_proj.weight`; current peft
nests it as `q_proj.base_layer.weight`. `map_official_keys` renames the old layout onto our modules, which
use the same attribute names (`llm`, `input_resampler`, `output_resampler`).

Sizes are read from the files (`detokenizer_sizes` here; the rest in `labkit.models.paper_weights`), so that SDXL
base and the reduced random copies of `labkit.models.official_layout` load by the same code.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from labkit.core.errors import LabError
from labkit.core.presets import DetokenizerPreset, get_preset
from labkit.models.detokenizer import Detokenizer

# What the `paper` preset reads, relative to the weights folder the user names (the official layout).
# Llama-2-7b-hf as its Hugging Face repo lays it out (sharded safetensors: `require_paper_weights` also checks the
# shards its index names), read with `tokenizers` from tokenizer.json rather than SentencePiece's tokenizer.model.
LLAMA_INDEX = "Llama-2-7b-hf/model.safetensors.index.json"
PAPER_FILES = {
    "llama": ("Llama-2-7b-hf/config.json", "Llama-2-7b-hf/tokenizer.json", LLAMA_INDEX),
    # the released agent and the ids of its 66 added tokens (configs/tokenizer/clm_llama_tokenizer.yaml)
    "agent": ("seed_story/george_sft/pytorch_model.bin", "cvlm_llama2_tokenizer/added_tokens.json"),
    "visual_tokenizer": ("visual_tokenizer/qwen_vit_G.pt",),
    # SDXL base 1.0 as the Hugging Face repo lays it out, and the released de-tokenizers
    # (configs/detokenizer/detokenizer_sdxl_qwen_vit_{pretrained,adapted}.yaml)
    "sdxl": (
        "stable-diffusion-xl-base-1.0/unet/config.json",
        "stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors",
        "stable-diffusion-xl-base-1.0/vae/config.json",
        "stable-diffusion-xl-base-1.0/vae/diffusion_pytorch_model.safetensors",
        "stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json",
    ),
    "detokenizer_pretrained": ("detokenizer/detokenizer_pretrained/checkpoint-55000/pytorch_model.bin",),
    "detokenizer_adapted": ("detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin",),
}
SDXL = "stable-diffusion-xl-base-1.0"
_LORA_TARGET = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(weight|bias)$")
# Released tensors we rebuild rather than load: the resamplers' fixed sin-cos tables (frozen parameters in the
# official `Resampler`) and RoPE's inverse frequencies (a persistent buffer of each layer in the official
# `modeling_llama_xformer.py`, recomputed from config.json by transformers).
_REBUILT = re.compile(r"^(input|output)_resampler\.pos_embed$|\.rotary_emb\.inv_freq$")


def require_paper_weights(folder: Path | str, parts: tuple[str, ...] = tuple(PAPER_FILES)) -> dict[str, Path]:
    """Check, before any work, that every file the `paper` preset needs is there; list every missing path."""
    folder = Path(folder)
    found, missing = {}, []
    for part in parts:
        for relative in PAPER_FILES[part]:
            path = folder / relative
            (found.__setitem__(relative, path) if path.is_file() else missing.append(str(path)))
    if "llama" in parts:  # and the shards Llama's index names
        missing += [str(path) for path in _missing_shards(folder / LLAMA_INDEX)]
    if missing:
        listing = "\n  ".join(missing)
        raise LabError(
            f"the paper preset needs local weights that are missing under {folder}:\n  {listing}\n"
            "Put Llama-2-7b-hf, the released SEED-Story checkpoints and the extracted Qwen-VL ViT there "
            "(the official README's pretrained/ layout); nothing is downloaded."
        )
    return found


def _missing_shards(index: Path) -> list[Path]:
    if not index.is_file():
        return []
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        raise LabError(f"{index}: not a safetensors index (expected a 'weight_map' object)") from None
    return [index.parent / name for name in names if not (index.parent / name).is_file()]


def map_official_keys(state: dict[str, torch.Tensor], ours: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a released agent state dict onto our model's keys; return it and the keys we could not place."""
    mapped, unplaced = {}, []
    for key, value in state.items():
        if _REBUILT.search(key):
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
    state = read_state(path)
    ours = model.state_dict()
    mapped, unplaced = map_official_keys(state, set(ours))
    missing = sorted(set(ours) - set(mapped))
    model.load_state_dict(mapped, strict=False)
    return {"missing": missing, "unexpected": unplaced}


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A released state dict (torch `.bin`/`.pt`, or safetensors) on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # memory-mapped: a 14 GB agent is read as its tensors are copied into the model, never held twice
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) torch file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def detokenizer_sizes(unet: dict, vae: dict, state: dict[str, torch.Tensor]) -> tuple[DetokenizerPreset, int]:
    """(the de-tokenizer's sizes, the feature width D it reads) from SDXL's unet/ and vae/ config.json and the
    released `resampler.*` shapes, so that SDXL base and a reduced copy in the same layout load by the same code.

    Head counts are not in the shapes: the official `ResamplerXLV2` has `dim_head: 64`, so heads = width / 64."""
    try:
        dim, feature_dim = state["resampler.proj_in.weight"].shape
        depth = len({key.split(".")[2] for key in state if key.startswith("resampler.layers.")})
        inner = state["resampler.layers.0.0.to_q.weight"].shape[0]
        queries = state["resampler.latents"].shape[1]
        widths = (state["resampler.unet_proj_1.weight"].shape[0], state["resampler.unet_proj_2.weight"].shape[0])
        feed_forward = state["resampler.layers.0.1.1.weight"].shape[0]
    except KeyError as error:
        raise LabError(f"the released de-tokenizer lacks {error.args[0]} (not an SDXLAdapter state dict?)") from None
    if feed_forward != 4 * dim or inner % _RESAMPLER_HEAD_WIDTH:
        raise LabError(
            f"the de-tokenizer's resampler has ff width {feed_forward} and attention width {inner} for dim {dim}; "
            f"expected ff_mult 4 and heads of width {_RESAMPLER_HEAD_WIDTH} (ResamplerXLV2 as released)"
        )
    sizes = replace(
        get_preset("paper").detokenizer,
        image_size=unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1),
        vae_channels=tuple(vae["block_out_channels"]),
        vae_layers=vae["layers_per_block"],
        latent_channels=vae["latent_channels"],
        unet_channels=tuple(unet["block_out_channels"]),
        unet_layers=unet["layers_per_block"],
        transformer_layers=_per_level(unet["transformer_layers_per_block"], unet["block_out_channels"]),
        attention_heads=_per_level(unet["attention_head_dim"], unet["block_out_channels"]),
        norm_groups=unet["norm_num_groups"],
        cross_widths=widths,
        time_embed_dim=unet["addition_time_embed_dim"],
        resampler_dim=dim,
        resampler_depth=depth,
        resampler_heads=inner // _RESAMPLER_HEAD_WIDTH,
        resampler_head_dim=_RESAMPLER_HEAD_WIDTH,
        resampler_queries=queries,
    )
    return sizes, feature_dim


_RESAMPLER_HEAD_WIDTH = 64  # configs/detokenizer/detokenizer_sdxl_qwen_vit_*.yaml: dim_head 64


def _per_level(value, levels) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(levels)


def load_official_detokenizer(
    folder: Path | str,
    which: str = "adapted",
    dtype: torch.dtype = torch.bfloat16,
    num_features: int | None = None,
):
    """SDXL base (unet/, vae/, scheduler/ from `<folder>/stable-diffusion-xl-base-1.0`) + a released de-tokenizer
    (`pretrained` = stage 1, `adapted` = stage 3 on George). Every missing file is listed before any loading.
    Sizes come from the files (`detokenizer_sizes`); `num_features`, which no de-tokenizer file holds, is the
    visual tokenizer's N (default: the paper's 256).

    Returns (detokenizer, report) where report lists the released keys we could not place and ours left unset.
    The guidance negative (ViT features of a blank 448 px image) is left for the caller to set from Qwen-VL's ViT.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    if which not in ("pretrained", "adapted"):
        raise LabError(f"which: 'pretrained' or 'adapted' (got {which!r})")
    folder = Path(folder)
    found = require_paper_weights(folder, ("sdxl", f"detokenizer_{which}"))
    sdxl = folder / SDXL
    state = read_state(found[PAPER_FILES[f"detokenizer_{which}"][0]])
    unet = UNet2DConditionModel.from_pretrained(sdxl / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(sdxl / "vae", torch_dtype=dtype)
    sizes, feature_dim = detokenizer_sizes(dict(unet.config), dict(vae.config), state)
    features = num_features or get_preset("paper").visual_tokenizer.num_features
    model = Detokenizer(sizes, features, feature_dim, preset="paper", unet=unet, vae=vae)
    model.sample_scheduler = EulerDiscreteScheduler.from_pretrained(sdxl / "scheduler")
    model.resampler.to(dtype)
    ours = model.state_dict()
    mapped = {k: v for k, v in state.items() if k in ours and k.startswith(("resampler.", "unet."))}
    model.load_state_dict(mapped, strict=False)
    missing = sorted(k for k in ours if k.startswith("resampler.") and k not in mapped)
    return model.eval(), {
        "unexpected": sorted(set(state) - set(mapped)),
        "missing_resampler": missing,
        "unet_keys_loaded": sum(k.startswith("unet.") for k in mapped),
    }
