"""GPU memory per process for stage 2 at the paper preset under DDP, FSDP full shard and DeepSpeed ZeRO-2, computed.

The parameter counts come from the model itself, built on the `meta` device (no weights, no memory): the frozen
Llama-2-7B body, and what trains (LoRA r 16 on the seven projections, the norms' copies, the resized embedding and
head, both resamplers: `configs/clm_models/llama2chat7b_lora.yaml`). The rest is arithmetic, under these assumptions:

- under DDP and FSDP the model is fp32 (the step autocasts to bf16; `labkit.training.stage2_lora` says why), trained
  tensors have fp32 gradients and AdamW's two fp32 moments; under ZeRO-2 DeepSpeed casts the whole model to bf16 and
  keeps fp32 master weights and moments in its partitioned optimizer, gradients reduced in bf16
  (`configs/accelerate/stage2_bf16_dp.json`);
- DDP keeps a second copy of the gradients in its all-reduce buckets (`gradient_as_bucket_view=False`, the default);
- FSDP shards everything over the GPUs and gathers one decoder layer at a time in bf16 (two with backward
  prefetch) and the root unit (embedding, head, resamplers) for the whole step; evaluation then gathers the whole
  model once more (`labkit.training.sharding`), which these training figures leave out;
- the official batch: 240 samples per step (30 per GPU on 8 GPUs, `configs/data/george_sft.yaml`) split evenly over
  the GPUs (`labkit.training.loop.batch_rows`; no gradient accumulation), every sample padded to `max_length` 1280;
- activations, bf16, with SDPA (no T x T attention matrix stored): with gradient checkpointing (the official
  `train_clm_sft.py` turns it on) each layer keeps its input and one layer is recomputed at a time; without it each
  layer keeps what its backward needs (`_LAYER_ACTIVATIONS`). The logits are kept in bf16 and in fp32 (the loss
  upcasts them) with their fp32 gradient: at 32066 tokens that alone is ~10 bytes per token per vocabulary entry;
- 1 GiB per process of CUDA context and allocator slack. Fragmentation is not modelled: read the totals as floors.

Stage 3 at the paper preset (`stage3_memory_per_gpu`, `labkit.training.stage3_paper`): the de-tokenizer built on the
`meta` device (SDXL base's 2.57 B UNet, its 84 M VAE, the `ResamplerXLV2`), what trains as
`Detokenizer.set_trainable(mode)` says (`official`: the resampler + every to_k / to_v, `SDXLAdapter.set_trainable_v2`;
`full`: the resampler + the whole UNet), the same per-strategy sums (FSDP's unit: one UNet down / mid / up block;
its root: resampler, VAE, time embeddings, conv in/out), and the official batch (`scripts/adapt_storystream.sh`:
4 per GPU x 8 GPUs x 4 accumulation = 128 samples per step, here split over the GPUs with no accumulation) at
1024 px (a 128 x 128 latent). Activations, bf16, counted per [C, T] feature map of each UNet level
(`_RESNET_MAPS`, `_TRANSFORMER_LAYER_MAPS`, with memory-efficient attention: no T x T matrix kept); with gradient
checkpointing (the official script's `unet.enable_gradient_checkpointing()`, diffusers checkpoints each ResNet and
each transformer layer) each unit keeps its input and one unit is recomputed at a time. The frozen MLLM's
regressed features are cached beforehand (no 7B model on the GPU while training) and the VAE encodes the targets
under `no_grad` before the UNet runs; its transient peak is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from labkit.core.errors import ParameterError
from labkit.core.presets import DetokenizerPreset, Preset
from labkit.models.detokenizer import Detokenizer
from labkit.models.mllm import SeedStoryMLLM

STRATEGIES = ("ddp", "fsdp", "zero2")
GIB = 2**30
CONTEXT_BYTES = GIB
ZERO2_BUCKETS = 2 * int(2e8) * 2  # allgather + reduce buckets of 2e8 bf16 elements (stage2_bf16_dp.json)
# Per decoder layer, per token, what autograd keeps without checkpointing, in (count, width, bytes) terms of the
# hidden size H and the MLP width I: the fp32 inputs of the two RMSNorms; the normed inputs of q/k/v and of gate/up;
# LoRA's dropped-out copies of the seven projections' inputs; rotated q and k; SDPA's q, k, v and output; o_proj's
# input; gate and up outputs, SiLU's output and down_proj's input.
_LAYER_ACTIVATIONS = (
    (2, "H", 4),  # RMSNorm inputs (fp32)
    (2, "H", 2),  # normed inputs
    (6, "H", 2),  # LoRA dropout copies: q, k, v, o, gate, up
    (1, "I", 2),  # LoRA dropout copy: down
    (2, "H", 2),  # rotated q, k
    (4, "H", 2),  # SDPA q, k, v, output
    (1, "H", 2),  # o_proj input
    (4, "I", 2),  # gate, up, SiLU(gate), down_proj input
)


@dataclass(frozen=True)
class Workload:
    global_batch: int = 240  # samples per optimizer step, all GPUs together
    sequence: int = 1280  # tokens per sample (padded)
    checkpointing: bool = True


@dataclass(frozen=True)
class ParameterSplit:
    """Parameter counts of the MLLM that stage 2 trains."""

    frozen: int  # the body: every Llama weight LoRA wraps and the original norms `modules_to_save` copies
    trainable: int  # LoRA, the norms' copies, embedding, head, resamplers
    layer: int  # one decoder layer, LoRA included (FSDP's unit)
    root: int  # outside the decoder layers: embedding, head, final norm, resamplers (FSDP's root unit)


@lru_cache(maxsize=8)
def parameter_split(preset: Preset, vocab_size: int) -> ParameterSplit:
    """Counted on the meta device, with LoRA applied as training applies it (a few seconds at 7B: cached)."""
    with torch.device("meta"):
        model = SeedStoryMLLM(preset, vocab_size)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = model.causal_lm.model.layers
    layer = sum(p.numel() for p in layers[0].parameters())
    return ParameterSplit(frozen, trainable, layer, frozen + trainable - layer * len(layers))


def activation_bytes(preset: Preset, vocab_size: int, rows: int, sequence: int, checkpointing: bool) -> int:
    """Activation memory of one process's share of a step (see the module docstring)."""
    llm = preset.mllm.llm
    width = {"H": llm.hidden_size, "I": llm.intermediate_size}
    tokens = rows * sequence
    per_layer = tokens * sum(count * width[dim] * size for count, dim, size in _LAYER_ACTIVATIONS)
    if checkpointing:
        layers = llm.layers * tokens * llm.hidden_size * 2 + per_layer  # layer inputs + one layer recomputed
    else:
        layers = llm.layers * per_layer
    logits = tokens * vocab_size * (2 + 4 + 4)  # bf16 logits, their fp32 copy and its gradient
    return layers + logits


def _check(strategy: str, gpus: int) -> None:
    if strategy not in STRATEGIES:
        raise ParameterError("strategy", f"one of {', '.join(STRATEGIES)} (got {strategy!r})")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ParameterError("gpus", f"an int >= 1 (got {gpus!r})")


def memory_per_gpu(
    preset: Preset, vocab_size: int, strategy: str, gpus: int, workload: Workload = Workload()
) -> dict[str, float]:
    """GiB per process by component (`weights`, `gradients`, `optimizer`, `activations`, `other`) and `total`."""
    _check(strategy, gpus)
    weights, gradients, optimizer, other = strategy_bytes(parameter_split(preset, vocab_size), strategy, gpus)
    rows = -(-workload.global_batch // gpus)
    activations = activation_bytes(preset, vocab_size, rows, workload.sequence, workload.checkpointing)
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "other": other + CONTEXT_BYTES,
    }
    out = {name: value / GIB for name, value in parts.items()}
    out["total"] = sum(out.values())
    return out


def strategy_bytes(split: ParameterSplit, strategy: str, gpus: int) -> tuple[float, float, float, int]:
    """(weights, gradients, optimizer, buckets) bytes per process: the assumptions of the module docstring."""
    frozen, trained = split.frozen, split.trainable
    if strategy == "ddp":
        return 4 * (frozen + trained), 4 * trained * 2, 8 * trained, 0
    if strategy == "fsdp":
        gathered = 2 * (2 * split.layer) + 2 * split.root  # two units (prefetch) and the root unit, in bf16
        return 4 * (frozen + trained) / gpus + gathered, 4 * trained / gpus, 8 * trained / gpus, 0
    # zero2: bf16 model + fp32 master partition; bf16 gradients reduced into fp32 partitions
    return 2 * (frozen + trained) + 4 * trained / gpus, 6 * trained / gpus, 8 * trained / gpus, ZERO2_BUCKETS


def memory_table(
    preset: Preset, vocab_size: int, gpus: tuple[int, ...] = (1, 2, 4, 8), workload: Workload = Workload()
) -> list[dict]:
    """One row per (strategy, number of GPUs): rows per GPU and GiB per GPU by component."""
    return _rows(lambda strategy, n: memory_per_gpu(preset, vocab_size, strategy, n, workload), workload, gpus)


def _rows(per_gpu, workload, gpus: tuple[int, ...]) -> list[dict]:
    """`per_gpu(strategy, gpus)` for every strategy and number of GPUs, with the samples each GPU takes."""
    return [
        {"strategy": strategy, "gpus": n, "rows_per_gpu": -(-workload.global_batch // n), **per_gpu(strategy, n)}
        for strategy in STRATEGIES
        for n in gpus
    ]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `memory_table` rows (GiB per GPU)."""
    head = "| config | GPUs | samples/GPU | weights | grads | AdamW | activations | other | **total GiB/GPU** |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r[k] for k in ("weights", "gradients", "optimizer", "activations", "other")]
        lines.append(
            f"| {r['strategy']} | {r['gpus']} | {r['rows_per_gpu']} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | **{r['total']:.1f}** |"
        )
    return "\n".join(lines)


# ---- stage 3: the de-tokenizer (SDXL) -------------------------------------------------------------------------

STAGE3_MODES = ("official", "full")
# bf16 [C, T] maps autograd keeps per unit without checkpointing: a ResNet block's two GroupNorm, SiLU and conv
# inputs; a transformer layer's three LayerNorm inputs, self-attention q, k, v, output and o-proj input,
# cross-attention q, output and o-proj input (k, v: 64 tokens, negligible), GEGLU's 8C projection, its 4C product
# and the 4C down-projection input; a Transformer2DModel's GroupNorm, proj_in, proj_out inputs and residual.
_RESNET_MAPS = 6
_TRANSFORMER_LAYER_MAPS = 3 + 5 + 3 + 8 + 4 + 4
_TRANSFORMER_WRAP_MAPS = 4


@dataclass(frozen=True)
class Stage3Workload:
    global_batch: int = 128  # samples per optimizer step (adapt_storystream.sh: 4 x 8 GPUs x 4 accumulation)
    checkpointing: bool = True  # train_sdxl_img2img_llm.py: unet.enable_gradient_checkpointing()


@lru_cache(maxsize=8)
def detokenizer_split(preset: Preset, mode: str) -> ParameterSplit:
    """The de-tokenizer's parameters counted on the meta device, split by `set_trainable(mode)`."""
    if mode not in STAGE3_MODES:
        raise ParameterError("mode", f"one of {', '.join(STAGE3_MODES)} (got {mode!r})")
    vit = preset.visual_tokenizer
    with torch.device("meta"):
        model = Detokenizer(preset.detokenizer, vit.num_features, vit.feature_dim, preset=preset.name)
    model.set_trainable(mode)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unet = model.unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    unit = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    root = frozen + trainable - sum(sum(p.numel() for p in block.parameters()) for block in blocks)
    return ParameterSplit(frozen, trainable, unit, root)


def detokenizer_activation_bytes(config: DetokenizerPreset, rows: int, checkpointing: bool) -> int:
    """Activation memory of `rows` samples through the UNet at the de-tokenizer's image size (module docstring)."""
    latent = config.image_size // 2 ** (len(config.vae_channels) - 1)
    last = len(config.unet_channels) - 1
    kept = peak = 0
    for level, (channels, layers) in enumerate(zip(config.unet_channels, config.transformer_layers)):
        one_map = rows * channels * (latent // 2**level) ** 2 * 2  # one bf16 [C, T] map
        resnets = 2 * config.unet_layers + 1 + (2 if level == last else 0)  # down, up (one more), mid
        transformers = 0 if level == 0 else 2 * config.unet_layers + 1 + (1 if level == last else 0)  # SDXL: none at 0
        if checkpointing:  # each unit's input, plus the transformer wrappers (not checkpointed)
            kept += one_map * (resnets + transformers * (_TRANSFORMER_WRAP_MAPS + layers))
            units = (_RESNET_MAPS, _TRANSFORMER_LAYER_MAPS if transformers else 0)
            peak = max(peak, one_map * max(units))  # one unit recomputed at a time
        else:
            kept += one_map * (
                resnets * _RESNET_MAPS + transformers * (_TRANSFORMER_WRAP_MAPS + layers * _TRANSFORMER_LAYER_MAPS)
            )
    return kept + peak


def stage3_memory_per_gpu(
    preset: Preset, mode: str, strategy: str, gpus: int, workload: Stage3Workload = Stage3Workload()
) -> dict[str, float]:
    """GiB per process of stage 3 by component (as `memory_per_gpu`) and `total`."""
    _check(strategy, gpus)
    weights, gradients, optimizer, other = strategy_bytes(detokenizer_split(preset, mode), strategy, gpus)
    rows = -(-workload.global_batch // gpus)
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": detokenizer_activation_bytes(preset.detokenizer, rows, workload.checkpointing),
        "other": other + CONTEXT_BYTES,
    }
    out = {name: value / GIB for name, value in parts.items()}
    out["total"] = sum(out.values())
    return out


def stage3_memory_table(
    preset: Preset, mode: str, gpus: tuple[int, ...] = (1, 2, 4, 8), workload: Stage3Workload = Stage3Workload()
) -> list[dict]:
    """`memory_table`'s rows for stage 3 in `mode` (`format_table` prints them)."""
    return _rows(lambda strategy, n: stage3_memory_per_gpu(preset, mode, strategy, n, workload), workload, gpus)
