"""The paper preset's memory per GPU: parameter counts from the model against the architecture's arithmetic, and the
per-strategy sums."""

from __future__ import annotations

import pytest
import torch

from labkit.core.errors import ParameterError
from labkit.core.presets import get_preset
from labkit.models.detokenizer import Detokenizer
from labkit.training.memory_plan import (
    GIB,
    Stage3Workload,
    Workload,
    activation_bytes,
    detokenizer_activation_bytes,
    detokenizer_split,
    format_table,
    memory_per_gpu,
    memory_table,
    parameter_split,
)
from labkit.training.memory_plan import stage3_memory_per_gpu as stage3

PAPER = get_preset("paper")
VOCAB = 32066  # Llama-2's 32000 + the release's 66 (llama2chat7b_lora.yaml)
LLAMA_2_7B = 6_738_415_616  # LlamaForCausalLM at Llama-2-7b-hf's config.json


def test_the_split_is_the_released_lora_configuration():
    split = parameter_split(PAPER, VOCAB)
    h, i, layers, r = 4096, 11008, 32, 16
    lora = layers * r * (4 * (h + h) + 2 * (h + i) + (i + h))  # q k v o, gate up, down: A (r x in) + B (out x r)
    embedding_and_head = 2 * VOCAB * h
    norm_copies = (2 * layers + 1) * h  # modules_to_save: input/post-attention norms of each layer, the final norm
    # frozen: Llama-2-7B without its 32000-row embedding and head (those train, resized), and nothing else
    assert split.frozen == LLAMA_2_7B - 2 * 32000 * h
    resamplers = split.trainable - lora - embedding_and_head - norm_copies
    assert lora == 39_976_960 and 130e6 < resamplers < 140e6  # about 135 M: 64- and 256-query cross-attention
    # one decoder layer as FSDP wraps it: attention, MLP, its two norms and their trainable copies, its LoRA
    assert split.layer == 4 * h * h + 3 * h * i + 2 * 2 * h + lora // layers


def test_the_sums_per_strategy():
    split = parameter_split(PAPER, VOCAB)
    ddp, fsdp, zero2 = (memory_per_gpu(PAPER, VOCAB, s, 8) for s in ("ddp", "fsdp", "zero2"))
    assert ddp["weights"] == pytest.approx(4 * (split.frozen + split.trainable) / GIB)  # fp32, autocast
    assert zero2["weights"] == pytest.approx((2 * (split.frozen + split.trainable) + 4 * split.trainable / 8) / GIB)
    assert ddp["optimizer"] == pytest.approx(8 * split.trainable / GIB)
    assert zero2["optimizer"] == pytest.approx(ddp["optimizer"] / 8)  # AdamW moments partitioned over 8
    assert fsdp["total"] < zero2["total"] < ddp["total"]
    # the batch is split over the GPUs: activations halve when the GPUs double
    one, two = (memory_per_gpu(PAPER, VOCAB, "zero2", n)["activations"] for n in (4, 8))
    assert two == pytest.approx(one / 2)
    with_checkpointing = activation_bytes(PAPER, VOCAB, 30, 1280, True)
    assert activation_bytes(PAPER, VOCAB, 30, 1280, False) > 5 * with_checkpointing
    # the logits alone, bf16 + fp32 + fp32 gradient, at 30 x 1280 tokens
    assert with_checkpointing > 30 * 1280 * VOCAB * 10
    # as the official run: ZeRO-2 on 8 GPUs fits an 80 GB A800, on 4 it does not
    assert memory_per_gpu(PAPER, VOCAB, "zero2", 8)["total"] < 80 * 1e9 / GIB
    assert memory_per_gpu(PAPER, VOCAB, "zero2", 4, Workload())["total"] > 80 * 1e9 / GIB


def test_the_table_and_bad_parameters():
    rows = memory_table(PAPER, VOCAB)
    assert [(r["strategy"], r["gpus"]) for r in rows][:4] == [("ddp", 1), ("ddp", 2), ("ddp", 4), ("ddp", 8)]
    assert len(rows) == 12 and format_table(rows).count("\n") == 13
    with pytest.raises(ParameterError, match="strategy"):
        memory_per_gpu(PAPER, VOCAB, "zero3", 8)
    with pytest.raises(ParameterError, match="gpus"):
        memory_per_gpu(PAPER, VOCAB, "ddp", 0)


def test_stage3_trains_what_set_trainable_says_and_sharding_helps():
    vit = PAPER.visual_tokenizer
    with torch.device("meta"):
        model = Detokenizer(PAPER.detokenizer, vit.num_features, vit.feature_dim, preset="paper")
    unet = sum(p.numel() for p in model.unet.parameters())
    assert 2.56e9 < unet < 2.58e9  # SDXL base's UNet
    for mode in ("official", "full"):
        names = set(model.set_trainable(mode))
        split = detokenizer_split(PAPER, mode)
        assert split.trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)
        assert split.frozen + split.trainable == sum(p.numel() for p in model.parameters())
    assert detokenizer_split(PAPER, "full").trainable > 4 * detokenizer_split(PAPER, "official").trainable
    for mode in ("official", "full"):
        ddp, fsdp, zero2 = (stage3(PAPER, mode, s, 8)["total"] for s in ("ddp", "fsdp", "zero2"))
        assert fsdp < ddp and zero2 < ddp  # sharding the optimizer (and FSDP the weights) saves memory per GPU
        assert stage3(PAPER, mode, "zero2", 8)["optimizer"] == pytest.approx(
            stage3(PAPER, mode, "ddp", 8)["optimizer"] / 8
        )
    # 16 samples per GPU at 1024 px: gradient checkpointing (the official script's) keeps activations several x lower
    assert detokenizer_activation_bytes(PAPER.detokenizer, 16, False) > 5 * detokenizer_activation_bytes(
        PAPER.detokenizer, 16, True
    )
    one, two = (stage3(PAPER, "official", "zero2", n, Stage3Workload())["activations"] for n in (4, 8))
    assert two == pytest.approx(one / 2)
    assert stage3(PAPER, "official", "zero2", 8)["total"] < 80 * 1e9 / GIB  # the official 8 x 80 GB run fits
    with pytest.raises(ParameterError, match="mode"):
        detokenizer_split(PAPER, "lora")
