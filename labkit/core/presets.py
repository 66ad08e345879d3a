"""Presets: one code path at three scales (docs/architecture.md, "Presets").

`tiny` runs on a 2-core laptop CPU, `small` on one 24 GB GPU, `paper` is the published configuration
(Llama-2-7B, 448 px ViT, 1024 px SDXL) and reads real weights from a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.core.errors import ParameterError


@dataclass(frozen=True)
class DataPreset:
    """The StoryStream-mini data set a preset trains and evaluates on."""

    image_size: int  # frames are rendered at this size (pixels, square)
    frames: int  # frames per story (StoryStream: 30)
    train_stories: int
    val_stories: int
    test_stories: int
    chunk_length: int  # training chunks (official: 10)
    bpe_merges: int  # tokens BPE learns on the training captions, beyond the 256 bytes
    image_tokens: int  # `<img_xxxxx>` tokens in the vocabulary (official: 64)


@dataclass(frozen=True)
class VisualTokenizerPreset:
    """ViT + attention-pool resampler -> `num_features` x `feature_dim` features (paper: 256 x 4096)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    num_features: int  # N, the attention pool's queries (a square number)
    feature_dim: int  # D
    pool_heads: int


@dataclass(frozen=True)
class LLMPreset:
    """The Llama body (`transformers.LlamaConfig` fields)."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    max_positions: int
    base_vocab: int  # vocabulary before the image tokens are added (paper: Llama-2's 32000)


@dataclass(frozen=True)
class LoraPreset:
    r: int
    alpha: int
    dropout: float
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MLLMPreset:
    llm: LLMPreset
    num_queries: int  # Q image slots per image (paper: 64)
    resampler_heads: int  # input resampler heads (paper: 4096 / 128 = 32)
    output_heads: int  # output resampler heads
    lora: LoraPreset | None  # None: train the whole LLM (tiny); `paper` preset: PAPER_LORA (released config)


@dataclass(frozen=True)
class DetokenizerPreset:
    """SDXL-architecture de-tokenizer (paper: SDXL base + the official `ResamplerXLV2`), sized by preset.

    The UNet fields are `diffusers.UNet2DConditionModel` arguments; `attention_heads` is what diffusers calls
    `attention_head_dim` (a legacy name: it is the number of heads). `cross_widths` are SDXL's two text-encoder
    widths (CLIP-L 768 + OpenCLIP-bigG 1280) that the resampler imitates; the pooled vector has the second width.
    The resampler's attention pool uses `resampler_heads`, as the official `ResamplerXLV2`.
    """

    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    latent_channels: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    transformer_layers: tuple[int, ...]
    attention_heads: tuple[int, ...]
    norm_groups: int
    cross_widths: tuple[int, int]
    time_embed_dim: int  # SDXL's addition_time_embed_dim
    resampler_dim: int
    resampler_depth: int
    resampler_heads: int
    resampler_head_dim: int
    resampler_queries: int  # conditioning tokens the UNet cross-attends to (paper: 64)


@dataclass(frozen=True)
class Preset:
    name: str
    data: DataPreset
    visual_tokenizer: VisualTokenizerPreset
    mllm: MLLMPreset
    detokenizer: DetokenizerPreset
    # Capabilities, so that code asks what a preset can do rather than which preset it is:
    # the paper preset reads the released/pretrained weights (Qwen-VL ViT, Llama-2-7B, SDXL, SEED-Story) from
    # the weights folder instead of training stage 0 and stage 1 itself.
    pretrained_weights: bool = False


PAPER_LORA = LoraPreset(r=16, alpha=32, dropout=0.05)  # configs/clm_models/llama2chat7b_lora.yaml (paper text says r=6)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        DataPreset(
            image_size=64,
            frames=30,
            train_stories=160,
            val_stories=24,
            test_stories=24,
            chunk_length=10,
            bpe_merges=1024,
            image_tokens=64,
        ),
        VisualTokenizerPreset(
            image_size=64,
            patch_size=8,
            width=96,
            layers=4,
            heads=4,
            mlp_width=384,
            num_features=16,
            feature_dim=64,
            pool_heads=4,
        ),
        MLLMPreset(
            LLMPreset(
                hidden_size=160, layers=6, heads=5, kv_heads=5, intermediate_size=432, max_positions=8192, base_vocab=0
            ),
            num_queries=16,
            resampler_heads=5,
            output_heads=4,
            lora=None,
        ),
        # Measured: a latent design (VAE 4x down to 16x16, UNet (32, 64, 64) with attention on the two lower
        # levels) learns where pixel-space diffusion does not in CPU minutes. 8 latent channels, not SDXL's 4:
        # measured, after 300 VAE steps 8 channels keep the character in 60% of reconstructions, 4 in 52%
        DetokenizerPreset(
            image_size=64,
            vae_channels=(32, 64, 64),
            vae_layers=1,
            latent_channels=8,
            unet_channels=(32, 64, 64),
            unet_layers=1,
            transformer_layers=(1, 1, 1),
            attention_heads=(2, 4, 4),
            norm_groups=8,
            cross_widths=(32, 64),
            time_embed_dim=16,
            resampler_dim=64,
            resampler_depth=2,
            resampler_heads=4,
            resampler_head_dim=16,
            resampler_queries=16,
        ),
    ),
    "small": Preset(
        "small",
        DataPreset(
            image_size=128,
            frames=30,
            train_stories=2000,
            val_stories=100,
            test_stories=100,
            chunk_length=10,
            bpe_merges=4096,
            image_tokens=64,
        ),
        VisualTokenizerPreset(
            image_size=128,
            patch_size=16,
            width=384,
            layers=8,
            heads=6,
            mlp_width=1536,
            num_features=64,
            feature_dim=512,
            pool_heads=8,
        ),
        MLLMPreset(
            LLMPreset(
                hidden_size=768,
                layers=12,
                heads=12,
                kv_heads=12,
                intermediate_size=2048,
                max_positions=4096,
                base_vocab=0,
            ),
            num_queries=36,
            resampler_heads=12,
            output_heads=8,
            lora=None,
        ),
        DetokenizerPreset(
            image_size=128,
            vae_channels=(64, 128, 256, 256),
            vae_layers=2,
            latent_channels=4,
            unet_channels=(128, 256, 512),
            unet_layers=2,
            transformer_layers=(1, 1, 2),
            attention_heads=(2, 4, 8),
            norm_groups=32,
            cross_widths=(256, 512),
            time_embed_dim=128,
            resampler_dim=512,
            resampler_depth=4,
            resampler_heads=8,
            resampler_head_dim=64,
            resampler_queries=64,
        ),
    ),
    "paper": Preset(
        "paper",
        DataPreset(
            image_size=448,
            frames=30,
            train_stories=8000,
            val_stories=180,
            test_stories=180,
            chunk_length=10,
            bpe_merges=32000,
            image_tokens=64,
        ),
        # Qwen-VL ViT-bigG (configs/visual_tokenizer/qwen_vitg_448.yaml): 448 px, patch 14, width 1664, 48 layers
        VisualTokenizerPreset(
            image_size=448,
            patch_size=14,
            width=1664,
            layers=48,
            heads=16,
            mlp_width=8192,
            num_features=256,
            feature_dim=4096,
            pool_heads=32,
        ),
        # Llama-2-7B; vocabulary 32000 + <img>, </img> + 64 image tokens = 32066 (llama2chat7b_lora.yaml)
        MLLMPreset(
            LLMPreset(
                hidden_size=4096,
                layers=32,
                heads=32,
                kv_heads=32,
                intermediate_size=11008,
                max_positions=4096,
                base_vocab=32000,
            ),
            num_queries=64,
            resampler_heads=32,
            output_heads=32,
            lora=PAPER_LORA,
        ),
        # SDXL base 1.0 (unet/config.json, vae/config.json) + ResamplerXLV2(dim 1024, depth 4, dim_head 64,
        # heads 16, num_queries 64, output 768 + 1280) from configs/detokenizer/detokenizer_sdxl_qwen_vit_*.yaml
        DetokenizerPreset(
            image_size=1024,
            vae_channels=(128, 256, 512, 512),
            vae_layers=2,
            latent_channels=4,
            unet_channels=(320, 640, 1280),
            unet_layers=2,
            transformer_layers=(1, 2, 10),
            attention_heads=(5, 10, 20),
            norm_groups=32,
            cross_widths=(768, 1280),
            time_embed_dim=256,
            resampler_dim=1024,
            resampler_depth=4,
            resampler_heads=16,
            resampler_head_dim=64,
            resampler_queries=64,
        ),
        pretrained_weights=True,
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name is a parameter error that lists the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ParameterError("--preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# Set by `labkit report` for its notebook kernels: the preset the notebooks run at. Their text quotes the tiny
# preset's results, so `labkit.course.claims` only enforces the quoted numbers there.
REPORT_PRESET_ENV = "LABKIT_REPORT_PRESET"
