"""The SEED-Story MLLM: a Llama that reads images through an input resampler and writes image features
through an output resampler (paper §3.1; official `src/models_clm/models.py::ContinuousLVLM`).

- `input_resampler`: Q learned queries attend to an image's N×D visual-tokenizer features; the Q outputs
  replace the embeddings of the Q `<img_xxxxx>` slots between `<img>` and `</img>`.
- `output_resampler`: N learned queries attend to the last-layer hidden states (after the final RMSNorm, as
  the official xformers Llama returns them) of the Q slots of the image being generated -> N×D features.
  The "learnable queries" of generation are the trainable embedding rows of the `<img_xxxxx>` tokens.
- Loss: next-token cross-entropy on the text targets + (1 - cosine) to the target image's features, both
  with weight 1 (`lm_loss_scale`, `rec_loss_scale` = 1.0 in the official configs).

The LLM is `transformers.LlamaForCausalLM`; at `paper` size it gets LoRA r=16, α=32, dropout 0.05 on the
seven projections through `peft`, with norms, embeddings and head fully trained, as the released config
(`configs/clm_models/llama2chat7b_lora.yaml`; the paper's text says r=6). At `tiny` the whole LLM trains, starting
from the lab's pre-trained language model (`labkit train lm`), as the paper's starts from pretrained Llama-2-7B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.core.presets import Preset
from labkit.data.layout import IGNORE_INDEX, StoryLayout, build_layout
from labkit.models.resampler import Resampler


def llm_config(preset: Preset, vocab_size: int) -> LlamaConfig:
    llm = preset.mllm.llm
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.layers,
        num_attention_heads=llm.heads,
        num_key_value_heads=llm.kv_heads,
        intermediate_size=llm.intermediate_size,
        max_position_embeddings=llm.max_positions,
        rms_norm_eps=1e-5 if llm.base_vocab else 1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def paper_vocab_size(preset: Preset) -> int:
    """Llama-2's 32000 + `<img>`, `</img>` + one token per image query = 32066 (official `llama2chat7b_lora.yaml`)."""
    return preset.mllm.llm.base_vocab + 2 + preset.data.image_tokens


def cosine_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(predicted, target), as the official `cosine_loss` (not MSE)."""
    return (1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)).mean()


@dataclass
class MLLMBatch:
    """Right-padded token layouts of several samples, with the features their image slots need."""

    input_ids: torch.Tensor  # long [B, T]
    labels: torch.Tensor  # long [B, T], -100 = no loss (padding included)
    image_input: torch.Tensor  # bool [B, T]: slots filled from `input_features`
    image_output: torch.Tensor  # bool [B, T]: slots whose hidden states are regressed
    input_features: torch.Tensor  # [M, N, D]: one row per context image, in (sample, image) order
    target_features: torch.Tensor  # [G, N, D]: one row per generated image, in (sample, image) order

    def to(self, device: torch.device | str) -> "MLLMBatch":
        return MLLMBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.labels,
                    self.image_input,
                    self.image_output,
                    self.input_features,
                    self.target_features,
                )
            )
        )

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(layouts: list[StoryLayout], features: list[torch.Tensor], pad_id: int) -> MLLMBatch:
    """Pad layouts on the right (the official collate pads right and ignores the padding mask, which is
    harmless under a causal mask) and split each sample's image features into inputs and targets.

    `features[i]` holds sample i's images in story order, [images_i, N, D].
    """
    length = max(len(layout) for layout in layouts)
    rows = len(layouts)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    image_input = torch.zeros((rows, length), dtype=torch.bool)
    image_output = torch.zeros((rows, length), dtype=torch.bool)
    inputs, targets = [], []
    for row, (layout, images) in enumerate(zip(layouts, features)):
        n = len(layout)
        input_ids[row, :n] = torch.tensor(layout.input_ids)
        labels[row, :n] = torch.tensor(layout.labels)
        image_input[row, :n] = torch.tensor(layout.image_input)
        image_output[row, :n] = torch.tensor(layout.image_output)
        for image in sorted({i for i, slot in zip(layout.image_index, layout.image_input) if slot}):
            inputs.append(images[image])
        for image in sorted({i for i, slot in zip(layout.image_index, layout.image_output) if slot}):
            targets.append(images[image])
    stack = lambda items: torch.stack(items) if items else features[0].new_zeros((0, *features[0].shape[1:]))  # noqa: E731
    return MLLMBatch(input_ids, labels, image_input, image_output, stack(inputs), stack(targets))


@dataclass
class MLLMOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    rec_loss: torch.Tensor
    logits: torch.Tensor
    regressed: torch.Tensor  # [G, N, D] features predicted for the generated images


class SeedStoryMLLM(nn.Module):
    """LlamaForCausalLM + input resampler + output resampler, sized by a preset."""

    def __init__(self, preset: Preset, vocab_size: int, lora: bool | None = None, llm: LlamaForCausalLM | None = None):
        """`llm`: a language model already loaded (Llama-2-7B `from_pretrained`, `labkit.models.paper_weights`)
        instead of a freshly initialised one; its vocabulary must already be `vocab_size`."""
        super().__init__()
        mllm, features = preset.mllm, preset.visual_tokenizer
        self.preset_name = preset.name
        self.num_queries = mllm.num_queries
        hidden = mllm.llm.hidden_size
        self.llm = llm if llm is not None else LlamaForCausalLM(llm_config(preset, vocab_size))
        self.input_resampler = Resampler(mllm.num_queries, hidden, mllm.resampler_heads, kv_dim=features.feature_dim)
        self.output_resampler = Resampler(features.num_features, features.feature_dim, mllm.output_heads, kv_dim=hidden)
        if mllm.lora is not None and lora is not False:
            self.llm = apply_lora(self.llm, mllm.lora)

    @property
    def causal_lm(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM itself (inside the peft wrapper when LoRA is on)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def embed(self, input_ids: torch.Tensor, image_input: torch.Tensor, input_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the context images' slots replaced by input-resampled features."""
        embeds = self.causal_lm.model.embed_tokens(input_ids)
        if input_features.shape[0]:
            slots = self.input_resampler(input_features.to(embeds)).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(image_input.unsqueeze(-1), slots.to(embeds.dtype))
        return embeds

    def regress(self, hidden: torch.Tensor, image_output: torch.Tensor) -> torch.Tensor:
        """Output resampler over the hidden states of each generated image's Q slots -> [G, N, D]."""
        slots = hidden[image_output].reshape(-1, self.num_queries, hidden.shape[-1])
        return self.output_resampler(slots)

    def forward(self, batch: MLLMBatch) -> MLLMOutput:
        embeds = self.embed(batch.input_ids, batch.image_input, batch.input_features)
        hidden = self.causal_lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # after the final norm
        logits = self.causal_lm.lm_head(hidden)
        lm_loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        if batch.target_features.shape[0]:
            regressed = self.regress(hidden, batch.image_output)
            rec_loss = cosine_loss(regressed, batch.target_features)
        else:  # keep the graph alive with a zero-weighted term, as the official code does for image-free batches
            regressed = hidden.new_zeros((0, *self.output_resampler.pos_embed.shape))
            rec_loss = 0.0 * sum(p.sum() for p in self.output_resampler.parameters())
        return MLLMOutput(lm_loss + rec_loss, lm_loss, rec_loss, logits, regressed)


def apply_lora(llm: LlamaForCausalLM, lora) -> nn.Module:
    """LoRA as `configs/clm_models/llama2chat7b_lora.yaml`: norms fully trained (`modules_to_save`), and the
    whole embedding and head set trainable (`get_peft_model_with_resize_embedding`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        task_type="CAUSAL_LM",
        modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"],
    )
    model = get_peft_model(llm, config)
    base = model.get_base_model()
    base.model.embed_tokens.weight.requires_grad_(True)
    base.lm_head.weight.requires_grad_(True)
    return model


def parameter_counts(model: SeedStoryMLLM) -> dict[str, dict[str, int]]:
    """Total and trainable parameters per component (works on the meta device)."""

    def count(module: nn.Module) -> dict[str, int]:
        params = list(module.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}

    counts = {
        "llm": count(model.llm),
        "input_resampler": count(model.input_resampler),
        "output_resampler": count(model.output_resampler),
    }
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    counts["lora"] = {
        "total": sum(p.numel() for p in lora),
        "trainable": sum(p.numel() for p in lora if p.requires_grad),
    }
    # the frozen body: every LLM weight that is neither LoRA nor a modules_to_save copy
    body = [p for n, p in model.llm.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    counts["llm_body"] = {
        "total": sum(p.numel() for p in body),
        "trainable": sum(p.numel() for p in body if p.requires_grad),
    }
    counts["all"] = count(model)
    return counts


@torch.no_grad()
def write_next_caption(
    model: SeedStoryMLLM, tokenizer, captions: list[str], features: torch.Tensor, max_new_tokens: int = 48
) -> str:
    """Greedy decoding of the caption that follows a teacher-forced story prefix (captions + their images).

    The model writes `[INST]` and a caption and stops at `<img>` (the official loop then forces the image
    slots). Image-slot tokens and `</img>` are banned outside images; the official `generation.py` only
    sets their logits to 0.0, a soft ban.
    """
    from transformers import DynamicCache

    layout = build_layout(captions, tokenizer, model.num_queries, text_loss=(), image_loss=())
    ids = torch.tensor([layout.input_ids[:-1]])  # everything up to the last </img>; drop </s>
    image_input = torch.tensor([layout.image_input[:-1]])
    banned = torch.tensor(tokenizer.image_token_ids + [tokenizer.eoi_id])
    body, head = model.causal_lm.model, model.causal_lm.lm_head
    cache = DynamicCache()
    hidden = body(inputs_embeds=model.embed(ids, image_input, features[: len(captions)]), cache=cache).last_hidden_state
    written: list[int] = []
    for _ in range(max_new_tokens):
        logits = head(hidden[:, -1]).float()
        logits[:, banned] = float("-inf")
        token = int(logits.argmax(-1))
        if token in (tokenizer.boi_id, tokenizer.eos_id):
            break
        written.append(token)
        hidden = body(inputs_embeds=body.embed_tokens(torch.tensor([[token]])), cache=cache).last_hidden_state
    return tokenizer.decode(written, skip_special_tokens=True).strip()
