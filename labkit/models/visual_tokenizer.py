"""The visual tokenizer: a ViT whose attention pool turns an image into N x D features (paper §3.1).

SEED-Story reads every image through Qwen-VL's ViT-bigG (`src/models/qwen_visual.py::VisionTransformerWithAttnPool`),
frozen, and the MLLM later *regresses* these features for the next image. The architecture, in order:

    patches   a Conv2d with kernel = stride = patch size, no bias            (Qwen: conv1)
    + learned absolute positions, a 16x16 table resized bicubically to the patch grid
    ln_pre -> pre-norm transformer blocks (LN, self-attention, LN, GELU MLP)  (Qwen: transformer.resblocks)
    attn_pool: the Qwen-VL Resampler, N learned queries over the patch tokens (labkit.models.resampler)
    ln_post -> x @ proj (a D x D matrix)                                      -> [B, N, D]

The same class builds the `tiny` tokenizer the lab trains itself (stage 0: 64 px, 0.5M parameters) and the
`paper` one (448 px, 48 layers, 256 x 4096 output, about 1.9B parameters), which `load_qwen_vit` fills with the
weights extracted from Qwen-VL-Chat.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from labkit.core.artifacts import config_hash, load_artifact, save_artifact
from labkit.core.errors import LabError, ParameterError
from labkit.core.presets import PRESETS, Preset, VisualTokenizerPreset
from labkit.models.resampler import Resampler, resize_positions, sincos_2d

STAGE = "visual_tokenizer"
POSITION_GRID = (
    16  # Qwen-VL learns 256 = 16x16 positions whatever the resolution; a smaller patch grid uses its own size
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen-VL's preprocessing (CLIP statistics), used with real weights
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisualAttention(nn.Module):
    """Self-attention with one fused `in_proj`, laid out per head as [q | k | v] (Qwen-VL's Megatron layout).

    `nn.MultiheadAttention` stacks all queries, then all keys, then all values; Qwen-VL's checkpoint interleaves
    them head by head, so we split the same way to load its weights unchanged.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ParameterError("heads", f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        qkv = self.in_proj(x).view(batch, tokens, self.heads, 3 * head_dim).transpose(1, 2)
        q, k, v = qkv.split(head_dim, dim=-1)  # each [B, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTokenizer(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> features [B, N, D] (paper: N=256, D=4096)."""

    def __init__(self, config: VisualTokenizerPreset):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ParameterError(
                "patch_size", f"image size {config.image_size} is not a multiple of patch {config.patch_size}"
            )
        self.config = config
        self.grid = config.image_size // config.patch_size
        self.clip_normalize = False  # True for Qwen-VL's real weights, which expect CLIP-normalised pixels
        width = config.width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        position_grid = min(self.grid, POSITION_GRID)
        self.positions = nn.Parameter(width**-0.5 * torch.randn(position_grid * position_grid, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(Block(width, config.heads, config.mlp_width) for _ in range(config.layers))
        self.attn_pool = Resampler(config.num_features, config.feature_dim, config.pool_heads, kv_dim=width)
        self.ln_post = nn.LayerNorm(config.feature_dim, eps=1e-6)
        self.proj = nn.Parameter(config.feature_dim**-0.5 * torch.randn(config.feature_dim, config.feature_dim))
        for module in self.modules():  # small initial weights, as ViTs (and the official resampler) use
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ParameterError(
                "images", f"expected [B, 3, H, W] float images in [-1, 1], got shape {tuple(images.shape)}"
            )
        dtype = self.patch_embed.weight.dtype
        x = images.to(dtype)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):  # the official transform squashes any frame to a square (bilinear)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.clip_normalize:
            mean = torch.tensor(CLIP_MEAN, dtype=dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, dtype=dtype, device=x.device).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        x = x + resize_positions(self.positions, x.shape[1])
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj

    # ---- artifacts -------------------------------------------------------------------------------------------

    def save_pretrained(
        self, folder: Path | str, manifest: dict, extra: dict[str, torch.Tensor] | None = None, half: bool = False
    ) -> Path:
        """Write weights + manifest (stage, config hash filled in); `extra` tensors go under the `extra.` prefix."""
        manifest = {**manifest, "stage": STAGE, "config_hash": config_hash(self.config), "config": self.config.__dict__}
        state = dict(self.state_dict())
        state.update({f"extra.{k}": v for k, v in (extra or {}).items()})
        return save_artifact(folder, state, manifest, half=half)

    @classmethod
    def from_pretrained(cls, folder: Path | str, preset: Preset) -> "VisualTokenizer":
        """Load a stage-0 artifact; refuse one made for another preset or with other sizes."""
        tokenizer, _, _ = load_visual_tokenizer(folder, preset)
        return tokenizer


def load_visual_tokenizer(folder: Path | str, preset: Preset) -> tuple[VisualTokenizer, dict[str, torch.Tensor], dict]:
    """(tokenizer in eval mode, the artifact's extra tensors without their prefix, manifest)."""
    config = preset.visual_tokenizer
    state, manifest = load_artifact(folder, STAGE, preset.name, config_hash(config))
    extra = {k[len("extra.") :]: v for k, v in state.items() if k.startswith("extra.")}
    model = VisualTokenizer(config)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("extra.")})
    return model.eval().requires_grad_(False), extra, manifest


# ---- Qwen-VL ViT-bigG weights ----------------------------------------------------------------------------------

# Qwen-VL's `transformer.visual` key prefixes -> ours. Everything else (ln_pre, attn_pool.*, ln_post, proj and the
# inside of each block: ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj) keeps its name.
QWEN_RENAMES = (
    ("conv1.", "patch_embed."),
    ("positional_embedding", "positions"),
    ("transformer.resblocks.", "blocks."),
)
QWEN_POOL_POSITIONS = "attn_pool.pos_embed"  # a frozen parameter in Qwen-VL, a rebuilt buffer here


def qwen_to_labkit_key(key: str) -> str:
    """Map one key of Qwen-VL's visual state dict onto VisualTokenizer's
    (a `visual.` / `transformer.visual.` prefix is dropped)."""
    key = re.sub(r"^(transformer\.)?visual\.", "", key)
    for old, new in QWEN_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def convert_qwen_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(our state dict, Qwen's attention-pool sin-cos table or None)."""
    converted, pool_positions = {}, None
    for key, value in state.items():
        ours = qwen_to_labkit_key(key)
        if ours == QWEN_POOL_POSITIONS:
            pool_positions = value
        else:
            converted[ours] = value
    return converted, pool_positions


def load_qwen_vit(path: Path | str, config: VisualTokenizerPreset | None = None) -> VisualTokenizer:
    """Build the paper's ViT-bigG (or `config`'s sizes) and fill it with Qwen-VL's extracted weights (`qwen_vit_G.pt`).

    The model is built on the `meta` device and the checkpoint's tensors are assigned in place, so the 1.9B
    parameters are never allocated twice. Any missing or unexpected key is an error that lists them.
    """
    path = Path(path)
    if not path.is_file():
        raise LabError(
            f"{path}: Qwen-VL ViT-bigG weights not found. Extract `transformer.visual` from Qwen-VL-Chat "
            "(SEED-Story's src/tools/reload_qwen_vit.py writes pretrained/QwenViT/qwen_vit_G.pt) and pass its path."
        )
    config = config or PRESETS["paper"].visual_tokenizer
    try:
        try:  # memory-mapped: the tensors are read from disk as they are assigned
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch file cannot be mapped
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise LabError(f"{path}: cannot read a torch state dict ({error})") from None
    if not isinstance(raw, dict):
        raise LabError(f"{path}: holds a {type(raw).__name__}, expected a state dict of Qwen-VL's transformer.visual")
    state, pool_positions = convert_qwen_state_dict(raw)
    with torch.device("meta"):
        model = VisualTokenizer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise LabError(
            f"{path}: does not match a {config.layers}-layer, width-{config.width} ViT: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in model.state_dict().items():
        if state[key].shape != tensor.shape:
            raise LabError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    model.load_state_dict(state, assign=True)
    # Qwen-VL stores the pool's sin-cos table (x before y); use it as stored so its queries see what they
    # were trained with.
    grid = int(config.num_features**0.5)
    table = pool_positions if pool_positions is not None else sincos_2d(config.feature_dim, grid)
    model.attn_pool.pos_embed = table.to(torch.float32)
    model.clip_normalize = True
    return model.eval().requires_grad_(False)


def count_parameters(config: VisualTokenizerPreset) -> int:
    """Parameters of a tokenizer with these sizes, counted on the `meta` device (no memory, no weights)."""
    with torch.device("meta"):
        model = VisualTokenizer(config)
    return sum(p.numel() for p in model.parameters())
