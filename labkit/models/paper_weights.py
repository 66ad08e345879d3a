"""The `paper` preset's models, built from the weights folder with the sizes read from the files (paper §3, §4.1).

What the official inference scripts load (`src/inference/gen_george.py`, `vis_george_sink.py`), from the layout of
`labkit.models.official_checkpoint.PAPER_FILES` under `$LABKIT_WEIGHTS`:

- Llama-2-7B: `LlamaForCausalLM.from_pretrained(Llama-2-7b-hf)` (bf16 on CUDA, fp32 on the CPU), its embedding
  resized to Llama-2's vocabulary + 66 (`llama2chat7b_lora.yaml`: `vocab_size: 32066`), wrapped with the released
  LoRA (`PAPER_LORA`), then the released agent `seed_story/george_sft/pytorch_model.bin` (input/output resamplers,
  LoRA, norms, embeddings; `agent_7b_sft.yaml`) through `load_official_agent`;
- the tokenizer: `Llama-2-7b-hf/tokenizer.json` + the release's added tokens (`labkit.data.llama_tokenizer`);
- Qwen-VL's ViT-bigG (`visual_tokenizer/qwen_vit_G.pt`) through `load_qwen_vit`;
- SDXL base + the adapted de-tokenizer through `load_official_detokenizer`, its guidance negative set to the ViT
  features of a blank image (the official pipeline's `visual_encoder(zeros)` after normalisation).

Every size comes from the files: Llama's from `config.json`, the ViT's and the resamplers' from the state-dict
shapes, SDXL's from `unet/config.json` and `vae/config.json`. So the same code loads the real 7B weights and the
reduced random ones `labkit.models.official_layout` writes. Two things no file holds are taken from the official
configs: the ViT's input size (448 px, `configs/visual_tokenizer/qwen_vitg_448.yaml`) and the head widths (ViT 104 =
1664 / 16; resamplers and attention pool 128 = 4096 / 32), so heads = width / head width.

Nothing is placed silently: a released key we cannot place is a loud warning, and a weight of ours that no file
provides (a LoRA matrix, a resampler, an embedding row) is an error that names the file and the keys.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from labkit.core.errors import LabError
from labkit.core.paths import weights_folder
from labkit.core.presets import PAPER_LORA, LLMPreset, Preset, VisualTokenizerPreset, get_preset
from labkit.data.llama_tokenizer import LlamaStoryTokenizer
from labkit.models.detokenizer import Detokenizer
from labkit.models.mllm import SeedStoryMLLM
from labkit.models.official_checkpoint import (
    PAPER_FILES,
    SDXL,
    detokenizer_sizes,
    load_official_agent,
    load_official_detokenizer,
    read_state,
    require_paper_weights,
)
from labkit.models.visual_tokenizer import CLIP_MEAN, VisualTokenizer, convert_qwen_state_dict, load_qwen_vit

STORY_PARTS = ("llama", "agent", "visual_tokenizer", "sdxl", "detokenizer_adapted")  # what inference reads
LLAMA = "Llama-2-7b-hf"
VIT_HEAD_WIDTH = 104  # Qwen-VL ViT-bigG: width 1664, 16 heads (qwen_vitg_448.yaml)
RESAMPLER_HEAD_WIDTH = 128  # Qwen-VL's attn_pool (output_dim // 128 heads) and agent_7b_sft.yaml (4096, 32 heads)
# Our weights that the released agent must provide: Llama-2-7b-hf holds none of them (LoRA, the fine-tuned norms,
# the 66 new embedding rows and the head, the two resamplers).
AGENT_ONLY = ("lora_", "modules_to_save.", "embed_tokens", "lm_head", "input_resampler.", "output_resampler.")


@dataclass
class PaperModels:
    """Everything `labkit story --preset paper` runs, and what loading placed."""

    preset: Preset  # the paper preset with the sizes read from the files
    mllm: SeedStoryMLLM
    tokenizer: LlamaStoryTokenizer
    visual_tokenizer: VisualTokenizer
    detokenizer: Detokenizer
    device: torch.device
    dtype: torch.dtype
    report: dict = field(default_factory=dict)  # per part: files, keys loaded, keys left, warnings


def paper_files(folder: Path | str | None = None, parts: tuple[str, ...] = STORY_PARTS) -> dict[str, Path]:
    """Every file inference reads (default folder `$LABKIT_WEIGHTS`), checked before any loading: one error lists
    every missing path, the Llama shards that `model.safetensors.index.json` names included."""
    return require_paper_weights(Path(folder) if folder is not None else weights_folder(), parts)


def read_sizes(folder: Path | str | None = None, which: str = "adapted") -> Preset:
    """The paper preset with every size replaced by what the files say (see the module docstring); `which`
    de-tokenizer's resampler gives the de-tokenizer's sizes."""
    folder = Path(folder) if folder is not None else weights_folder()
    files = paper_files(folder, (*STORY_PARTS[:-1], f"detokenizer_{which}"))
    config_path = files[f"{LLAMA}/config.json"]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        llm = LLMPreset(
            hidden_size=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            base_vocab=config["vocab_size"],
        )
    except KeyError as error:
        raise LabError(f"{config_path}: lacks {error.args[0]!r} (not a Llama config.json)") from None
    vit_path = files[PAPER_FILES["visual_tokenizer"][0]]
    vit = _vit_sizes(vit_path)
    agent_path = files[PAPER_FILES["agent"][0]]
    queries, hidden, num_features, feature_dim, kv_in, ranks = _agent_sizes(agent_path)
    if hidden != llm.hidden_size or (num_features, feature_dim) != (vit.num_features, vit.feature_dim):
        raise LabError(
            f"{agent_path}: its resamplers are for a {hidden}-wide LLM and {num_features}x{feature_dim} features, "
            f"but {config_path} says {llm.hidden_size} and {vit_path} makes {vit.num_features}x{vit.feature_dim}"
        )
    if kv_in != feature_dim or len(ranks) != 1:
        raise LabError(
            f"{agent_path}: input resampler reads {kv_in}-wide features (expected {feature_dim}); LoRA ranks {ranks}"
        )
    (rank,) = ranks
    sdxl = {
        part: json.loads(files[f"{SDXL}/{part}/config.json"].read_text(encoding="utf-8")) for part in ("unet", "vae")
    }
    detokenizer_path = files[PAPER_FILES[f"detokenizer_{which}"][0]]
    detokenizer, detokenizer_width = detokenizer_sizes(sdxl["unet"], sdxl["vae"], read_state(detokenizer_path))
    if detokenizer_width != feature_dim:
        raise LabError(f"{detokenizer_path}: reads {detokenizer_width}-wide features, the ViT makes {feature_dim}")
    paper = get_preset("paper")
    mllm = replace(
        paper.mllm,
        llm=llm,
        num_queries=queries,
        resampler_heads=_heads(hidden, RESAMPLER_HEAD_WIDTH, agent_path),
        output_heads=_heads(feature_dim, RESAMPLER_HEAD_WIDTH, agent_path),
        # alpha / r = 2 as released (r 16, alpha 32); r is the released lora_A's first dimension
        lora=replace(PAPER_LORA, r=rank, alpha=rank * PAPER_LORA.alpha // PAPER_LORA.r),
    )
    data = replace(paper.data, image_tokens=queries)
    return replace(paper, data=data, visual_tokenizer=vit, mllm=mllm, detokenizer=detokenizer)


def _agent_sizes(path: Path) -> tuple[int, int, int, int, int, set[int]]:
    """(Q, LLM width, N, D, the input resampler's key width, LoRA ranks) from the released agent's shapes."""
    agent = read_state(path)
    queries, hidden = _shape(agent, "input_resampler.query", path)
    num_features, feature_dim = _shape(agent, "output_resampler.query", path)
    kv_proj = agent.get("input_resampler.kv_proj.weight")  # absent when the widths agree (nn.Identity)
    kv_in = hidden if kv_proj is None else kv_proj.shape[1]
    ranks = {value.shape[0] for key, value in agent.items() if ".lora_A." in key}
    return queries, hidden, num_features, feature_dim, kv_in, ranks


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise LabError(f"{path}: lacks {key} (not a SEED-Story agent checkpoint?)")
    return tuple(state[key].shape)


def _heads(width: int, head_width: int, path: Path) -> int:
    if width % head_width:
        raise LabError(f"{path}: width {width} is not a whole number of {head_width}-wide heads (as released)")
    return width // head_width


def _vit_sizes(path: Path) -> VisualTokenizerPreset:
    """Qwen-VL ViT sizes from `qwen_vit_G.pt`'s shapes (448 px input: the official transform)."""
    raw = read_state(path)
    if not isinstance(raw, dict):
        raise LabError(f"{path}: holds a {type(raw).__name__}, expected a state dict of Qwen-VL's transformer.visual")
    state, _ = convert_qwen_state_dict(raw)
    shape = lambda key: _shape(state, key, path)  # noqa: E731
    width, _, _, patch = shape("patch_embed.weight")
    feature_dim = shape("proj")[0]
    return replace(
        get_preset("paper").visual_tokenizer,
        patch_size=patch,
        width=width,
        layers=len({key.split(".")[1] for key in state if key.startswith("blocks.")}),
        heads=_heads(width, VIT_HEAD_WIDTH, path),
        mlp_width=shape("blocks.0.mlp.c_fc.weight")[0],
        num_features=shape("attn_pool.query")[0],
        feature_dim=feature_dim,
        pool_heads=_heads(feature_dim, RESAMPLER_HEAD_WIDTH, path),
    )


def load_paper_models(
    folder: Path | str | None = None, device: torch.device | str | None = None, which: str = "adapted"
) -> PaperModels:
    """Load everything inference needs from `folder` (default `$LABKIT_WEIGHTS`) onto `device` (default: CUDA when
    available): bf16 on CUDA, fp32 on the CPU. `which` de-tokenizer: `adapted` (the official scripts') or
    `pretrained`."""
    folder = Path(folder) if folder is not None else weights_folder()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = tuple(p for p in STORY_PARTS if p != "detokenizer_adapted") + (f"detokenizer_{which}",)
    files = paper_files(folder, parts)
    preset = read_sizes(folder, which)
    tokenizer = LlamaStoryTokenizer.from_files(files[f"{LLAMA}/tokenizer.json"], files[PAPER_FILES["agent"][1]])
    if tokenizer.vocab_size - tokenizer.num_image_tokens - 2 != preset.mllm.llm.base_vocab:
        raise LabError(
            f"{files[f'{LLAMA}/tokenizer.json']}: {tokenizer.vocab_size - tokenizer.num_image_tokens - 2} tokens, "
            f"but {LLAMA}/config.json has vocab_size {preset.mllm.llm.base_vocab}"
        )
    if tokenizer.num_image_tokens != preset.mllm.num_queries:
        raise LabError(
            f"{files[PAPER_FILES['agent'][1]]}: {tokenizer.num_image_tokens} image tokens, but the agent's input "
            f"resampler has {preset.mllm.num_queries} queries"
        )
    report = {"folder": str(folder), "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    mllm, report["agent"] = _load_mllm(folder, preset, tokenizer, files, device, dtype)
    vit = load_qwen_vit(files[PAPER_FILES["visual_tokenizer"][0]], preset.visual_tokenizer).to(device, dtype)
    report["visual_tokenizer"] = {"file": str(files[PAPER_FILES["visual_tokenizer"][0]]), "placed": "every key"}
    detokenizer, placed = load_official_detokenizer(
        folder, which, dtype=dtype, num_features=preset.visual_tokenizer.num_features
    )
    path = files[PAPER_FILES[f"detokenizer_{which}"][0]]
    _check_placed(path, placed["missing_resampler"], placed["unexpected"], ("resampler.", "unet."))
    detokenizer = detokenizer.to(device)
    detokenizer.negative_features.copy_(blank_features(vit)[0].float())
    report["detokenizer"] = {"file": str(path), **placed}
    return PaperModels(preset, mllm.eval(), tokenizer, vit, detokenizer.eval(), device, dtype, report)


def load_llama(
    folder: Path, preset: Preset, vocab_size: int, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """`LlamaForCausalLM.from_pretrained(<folder>/Llama-2-7b-hf)` in `dtype` on `device`, its `config.json` checked
    against the preset's sizes first, its embedding and head resized to `vocab_size` (new rows drawn as the official
    transformers 4.34 `resize_token_embeddings`; inference overwrites them from the agent, training learns them).
    The one loader of the body: inference (`load_paper_models`) and stage 2's LoRA training both use it."""
    config_path = folder / LLAMA / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    llm = preset.mllm.llm
    expected = {
        "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_key_value_heads": llm.kv_heads,
        "intermediate_size": llm.intermediate_size,
        "vocab_size": llm.base_vocab,
    }
    wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k, v) != v}
    if wrong:
        listing = ", ".join(f"{k} {got} (preset {preset.name}: {want})" for k, (got, want) in wrong.items())
        raise LabError(f"{config_path}: not the {preset.name} preset's Llama: {listing}")
    # straight onto the GPU: eight processes each holding a 27 GB fp32 copy in host memory is too much
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    body = LlamaForCausalLM.from_pretrained(folder / LLAMA, dtype=dtype, attn_implementation="sdpa", **placement)
    body.resize_token_embeddings(vocab_size, mean_resizing=False)
    return body


def _load_mllm(
    folder: Path, preset: Preset, tokenizer: LlamaStoryTokenizer, files: dict, device: torch.device, dtype
) -> tuple[SeedStoryMLLM, dict]:
    """Llama-2 from its folder (`load_llama`), wrapped in LoRA, then the released agent on top (as the official
    `ContinuousLVLM.from_pretrained` loads it, `strict=False`, but with every key accounted for)."""
    llm = load_llama(folder, preset, tokenizer.vocab_size, device, dtype)  # rows 32000.. come from the agent
    with torch.device(device):
        model = SeedStoryMLLM(preset, tokenizer.vocab_size, llm=llm).to(dtype)
    path = files[PAPER_FILES["agent"][0]]
    placed = load_official_agent(model, path)
    unprovided = [key for key in placed["missing"] if any(part in key for part in AGENT_ONLY)]
    _check_placed(path, unprovided, placed["unexpected"], ("llm.", "input_resampler.", "output_resampler."))
    return model, {
        "file": str(path),
        "keys_loaded": len(model.state_dict()) - len(placed["missing"]),
        "from_llama_only": len(placed["missing"]),  # base weights the agent file did not repeat
        "unexpected": placed["unexpected"],
    }


def _check_placed(path: Path, missing: list[str], unexpected: list[str], ours: tuple[str, ...]) -> None:
    """Refuse weights of ours that nothing provided, and released keys under our module names that found no
    place (a renaming gone wrong); warn loudly about any other released key left unused."""
    misplaced = [key for key in unexpected if key.startswith(ours)]
    if missing or misplaced:
        raise LabError(
            f"{path}: does not fit the model built from the folder's sizes: "
            f"{len(missing)} weights not provided {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"{len(misplaced)} released keys not placed {misplaced[:6]}{' ...' if len(misplaced) > 6 else ''}"
        )
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} released keys were not used: {unexpected[:6]}", stacklevel=3)


@torch.no_grad()
def blank_features(vit: VisualTokenizer) -> torch.Tensor:
    """The guidance negative: ViT features [1, N, D] of the image that normalises to zeros (the official pipeline
    feeds `torch.zeros` to the ViT after its CLIP normalisation, i.e. a frame of the mean colour)."""
    size = vit.config.image_size
    weight = vit.patch_embed.weight
    mean = torch.tensor(CLIP_MEAN, device=weight.device).view(1, 3, 1, 1)
    return vit((2 * mean - 1).expand(1, 3, size, size).to(weight.dtype))


def encode_image(vit: VisualTokenizer, image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> ViT features [N, D] (float32; the ViT squashes the frame to its square input)."""
    weight = vit.patch_embed.weight
    with torch.no_grad():
        pixels = image.to(weight.device).float().div(127.5).sub(1.0).unsqueeze(0)
        return vit(pixels.to(weight.dtype))[0].float()
