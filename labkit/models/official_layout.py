"""Random weights in the official file layout, at reduced sizes: a smoke test of the `paper` path without 30 GB.

`write_official_layout(folder)` writes every file of `labkit.models.official_checkpoint.PAPER_FILES`, with the
key names and formats of the real ones, so that `labkit.models.paper_weights` (and `labkit story --preset paper`)
load it by exactly the code that loads the real weights:

- `Llama-2-7b-hf/`: a transformers folder, `config.json`, sharded fp16 `model-0000k-of-0000n.safetensors` + their
  index, `tokenizer.json` (byte-fallback BPE with Llama-2's normalizer and decoder);
- `cvlm_llama2_tokenizer/added_tokens.json`: the image tokens, then `<img>`, `</img>`, ids after Llama's vocabulary;
- `seed_story/george_sft/pytorch_model.bin`: the official `ContinuousLVLM` state dict, `llm.base_model.model.*` with
  peft 0.4 names (no `base_layer`) and each layer's `rotary_emb.inv_freq`, `input_resampler.*` and
  `output_resampler.*` with their `pos_embed`;
- `visual_tokenizer/qwen_vit_G.pt`: Qwen-VL's `transformer.visual` state dict (`conv1`, `positional_embedding`,
  `transformer.resblocks.*`, `attn_pool.*`, `ln_post`, `proj`);
- `stable-diffusion-xl-base-1.0/{unet,vae,scheduler}/`: diffusers folders (`config.json` +
  `diffusion_pytorch_model.safetensors`; SDXL's noise schedule);
- `detokenizer/.../pytorch_model.bin` (pretrained and adapted): the official `SDXLAdapter` state dict, `resampler.*`
  (`ResamplerXLV2` names) and `unet.*`.

Sizes (`LayoutSizes`) keep the official head widths (Llama 128, ViT 104, resamplers 128, de-tokenizer 64) so that
the loader's "heads = width / head width" rule holds; everything else is small. Nothing here is trained: the
story it produces is noise, and only the path is tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import LlamaForCausalLM

from labkit.core.atomic import build_directory, save_torch, write_text
from labkit.core.presets import PAPER_LORA, DetokenizerPreset, LLMPreset, Preset, VisualTokenizerPreset, get_preset
from labkit.data.llama_tokenizer import added_tokens, llama_format_tokenizer
from labkit.models.detokenizer import SDXL_SCHEDULE, Detokenizer, unet_config, vae_config
from labkit.models.mllm import SeedStoryMLLM, llm_config
from labkit.models.official_checkpoint import PAPER_FILES, SDXL
from labkit.models.paper_weights import LLAMA, RESAMPLER_HEAD_WIDTH, VIT_HEAD_WIDTH
from labkit.models.resampler import sincos_2d
from labkit.models.visual_tokenizer import QWEN_POOL_POSITIONS, QWEN_RENAMES, VisualTokenizer

# Text the small tokenizer learns its pieces from (Llama-2's 32000 come from 2T tokens).
TEXTS = (
    "Once upon a time, in a town filled with colorful buildings, a young boy named Timmy was standing on a sidewalk.",
    "George, the curious little monkey, found a shiny red key under the old oak tree in the park.",
    "The man in the yellow hat smiled and said: let us go to the museum together, George!",
    "They walked along the river, counting boats, ducks and clouds until the sun went down.",
)


@dataclass(frozen=True)
class LayoutSizes:
    """Reduced sizes (the released ones in comments). Widths are whole numbers of the official head widths."""

    llm_hidden: int = 2 * 128  # 4096 = 32 heads of 128
    llm_layers: int = 2  # 32
    llm_intermediate: int = 688  # 11008
    merges: int = 200  # Llama-2: 32000 pieces
    num_queries: int = 16  # 64 image slots per image (a square)
    lora_r: int = 4  # 16
    vit_width: int = 2 * VIT_HEAD_WIDTH  # 1664 = 16 heads of 104
    vit_layers: int = 2  # 48
    vit_mlp: int = 1024  # 8192
    patch_size: int = 14  # 14: a 448 px frame is 32 x 32 patches
    num_features: int = 16  # 256 (a square)
    feature_dim: int = 2 * RESAMPLER_HEAD_WIDTH  # 4096 = 32 heads of 128
    # tiny's de-tokenizer with SDXL's 4-level VAE (8x down to 4 latent channels) and the released resampler's
    # 64-wide heads: SDXL's layout at 64 px
    detokenizer: DetokenizerPreset = replace(
        get_preset("tiny").detokenizer,
        vae_channels=(32, 32, 64, 64),
        latent_channels=4,
        resampler_dim=128,
        resampler_heads=2,
        resampler_head_dim=64,
    )

    def preset(self, base_vocab: int) -> Preset:
        """The paper preset at these sizes (what `paper_weights.read_sizes` reads back from the files)."""
        paper = get_preset("paper")
        llm = LLMPreset(
            hidden_size=self.llm_hidden,
            layers=self.llm_layers,
            heads=self.llm_hidden // 128,
            kv_heads=self.llm_hidden // 128,
            intermediate_size=self.llm_intermediate,
            max_positions=4096,
            base_vocab=base_vocab,
        )
        vit = VisualTokenizerPreset(
            image_size=paper.visual_tokenizer.image_size,
            patch_size=self.patch_size,
            width=self.vit_width,
            layers=self.vit_layers,
            heads=self.vit_width // VIT_HEAD_WIDTH,
            mlp_width=self.vit_mlp,
            num_features=self.num_features,
            feature_dim=self.feature_dim,
            pool_heads=self.feature_dim // RESAMPLER_HEAD_WIDTH,
        )
        mllm = replace(
            paper.mllm,
            llm=llm,
            num_queries=self.num_queries,
            resampler_heads=self.llm_hidden // RESAMPLER_HEAD_WIDTH,
            output_heads=self.feature_dim // RESAMPLER_HEAD_WIDTH,
            lora=replace(PAPER_LORA, r=self.lora_r, alpha=2 * self.lora_r),
        )
        data = replace(paper.data, image_tokens=self.num_queries)
        return replace(paper, data=data, visual_tokenizer=vit, mllm=mllm, detokenizer=self.detokenizer)


def write_official_layout(folder: Path | str, sizes: LayoutSizes = LayoutSizes(), seed: int = 0) -> Path:
    """Write random weights in the official layout under `folder` (built in a temporary folder, then renamed;
    an existing non-empty `folder` is refused). Returns `folder`."""
    folder = Path(folder)
    with build_directory(folder) as tmp:
        torch.manual_seed(seed)
        tokenizer = llama_format_tokenizer(TEXTS, sizes.merges)
        base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        preset = sizes.preset(base_vocab)
        llm = _write_llama(tmp / LLAMA, preset, tokenizer)
        _write_agent(tmp, preset, llm, base_vocab)
        vit = VisualTokenizer(preset.visual_tokenizer)
        save_torch(qwen_state_dict(vit), tmp / PAPER_FILES["visual_tokenizer"][0])
        write_sdxl(tmp, preset)
    return folder


def _write_llama(folder: Path, preset: Preset, tokenizer) -> LlamaForCausalLM:
    config = llm_config(preset, preset.mllm.llm.base_vocab)  # <s> 1, </s> 2, untied head: as Llama-2's config.json
    model = LlamaForCausalLM(config)
    # fp16 and sharded, as the Hugging Face repo (two shards and model.safetensors.index.json)
    model.to(torch.float16).save_pretrained(folder, max_shard_size="2MB")
    tokenizer.save(str(folder / "tokenizer.json"))
    return model.float()


def _write_agent(folder: Path, preset: Preset, llm: LlamaForCausalLM, base_vocab: int) -> None:
    """The released agent: Llama's weights resized by 2 + Q rows, LoRA, fine-tuned norms, both resamplers."""
    queries = preset.mllm.num_queries
    write_text(folder / PAPER_FILES["agent"][1], json.dumps(added_tokens(base_vocab, queries), indent=2) + "\n")
    llm.resize_token_embeddings(base_vocab + 2 + queries, mean_resizing=False)
    model = SeedStoryMLLM(preset, base_vocab + 2 + queries, llm=llm)
    with torch.no_grad():  # peft starts lora_B at zero and the norm copies equal to Llama's: make them count
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_torch(official_agent_state(model), folder / PAPER_FILES["agent"][0])


def official_agent_state(model: SeedStoryMLLM) -> dict[str, torch.Tensor]:
    """Our agent's state dict under the released names: peft 0.4 keeps a LoRA layer's frozen weight at
    `q_proj.weight` (current peft: `q_proj.base_layer.weight`); the official Llama stores each layer's RoPE
    `inv_freq` and the official resamplers their sin-cos `pos_embed` (both rebuilt here, so not in ours)."""
    state = {key.replace(".base_layer.", "."): value.clone() for key, value in model.state_dict().items()}
    llm = model.causal_lm.config
    head_dim = llm.hidden_size // llm.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(llm.num_hidden_layers):
        state[f"llm.base_model.model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    for name in ("input_resampler", "output_resampler"):
        resampler = getattr(model, name)
        state[f"{name}.pos_embed"] = sincos_2d(resampler.embed_dim, int(resampler.num_queries**0.5))
    return state


def qwen_state_dict(model: VisualTokenizer) -> dict[str, torch.Tensor]:
    """A `VisualTokenizer`'s weights under Qwen-VL's `transformer.visual` names (what `reload_qwen_vit.py` saves)."""
    state = {}
    for key, value in model.state_dict().items():
        for qwen, ours in QWEN_RENAMES:
            if key.startswith(ours):
                key = qwen + key[len(ours) :]
                break
        state[key] = value.clone()
    state[QWEN_POOL_POSITIONS] = model.attn_pool.pos_embed.clone()  # a frozen parameter in Qwen-VL
    return state


def write_sdxl(folder: Path, preset: Preset) -> None:
    """SDXL base's three diffusers folders and both released de-tokenizers (`resampler.*` + `unet.*`) at `preset`'s
    de-tokenizer sizes, reading its visual tokenizer's features (the stage-3 test writes them beside a paper-shaped
    Llama)."""
    sizes, features = preset.detokenizer, preset.visual_tokenizer
    unet = UNet2DConditionModel(**unet_config(sizes))
    vae = AutoencoderKL(**vae_config(sizes), scaling_factor=0.13025)  # SDXL's VAE scaling factor
    sdxl = folder / SDXL
    unet.save_pretrained(sdxl / "unet")
    vae.save_pretrained(sdxl / "vae")
    EulerDiscreteScheduler(**SDXL_SCHEDULE).save_pretrained(sdxl / "scheduler")
    for which in ("detokenizer_pretrained", "detokenizer_adapted"):
        adapter = Detokenizer(sizes, features.num_features, features.feature_dim, "paper", unet=unet, vae=vae)
        state = {k: v for k, v in adapter.state_dict().items() if k.startswith(("resampler.", "unet."))}
        save_torch(state, folder / PAPER_FILES[which][0])


if __name__ == "__main__":  # python -m labkit.models.official_layout FOLDER: a smoke-test weights folder
    import sys

    print(f"wrote {write_official_layout(sys.argv[1])}: random weights in the official layout (LABKIT_WEIGHTS=...)")
