"""Stage 2 with LoRA on a frozen pretrained Llama: the `paper` preset's MLLM training (paper §3.2).

What the official run does (`scripts/sft_storystream.sh`, `src/train/train_clm_sft.py`,
`configs/clm_models/llama2chat7b_lora.yaml`): Llama-2-7B read with `from_pretrained` from `pretrained/Llama-2-7b-hf`,
its embedding resized to the tokenizer's 32066 rows, wrapped by peft LoRA (r 16, alpha 32, dropout 0.05 on the seven
projections; norms in `modules_to_save`; embedding and head trainable), both resamplers trained, gradient
checkpointing on, AdamW lr 1e-4 (wd 0.05, betas 0.9/0.98, eps 1e-6), 100 warm-up steps, 6000 steps, 30 samples per
GPU on 8 GPUs, bf16, DeepSpeed ZeRO-2. The lab runs the same through `labkit.training.loop` and
`configs/accelerate/` (`accelerate launch --config_file ...`).

Here the LLM comes from `$LABKIT_WEIGHTS/Llama-2-7b-hf` and the text tokenizer is Llama-2's + the release's 66 added
tokens (`labkit.data.llama_tokenizer`), so the data set's own BPE tokenizer is not used. Every size is checked
against the files before any work. The same functions train a paper-*shaped* small random Llama written in the
same folder layout (`labkit.training.paper_shaped`, the CPU test): only the sizes and the files differ.

The whole model is built in fp32 and the step runs under bf16 autocast on CUDA (`labkit.core.devices`), with fp32
evaluation as every stage; under FSDP (`configs/accelerate/fsdp.yaml`) evaluation and saving gather the shards
first (`labkit.training.sharding`). It costs 13 GB more per GPU
under DDP than a bf16 body would (`labkit.training.memory_plan`); under ZeRO-2 DeepSpeed casts the model to bf16
itself and keeps fp32 master weights in its partitioned optimizer, as the official run.

The artifact holds the resamplers, and in `llm/` the peft adapter (LoRA, norms, embedding and head, via
`save_pretrained(save_embedding_layers=True)`), never the 7B body: loading it reads the body from the weights
folder again.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from labkit.core.errors import LabError
from labkit.core.presets import Preset
from labkit.data.llama_tokenizer import LlamaStoryTokenizer
from labkit.models.mllm import SeedStoryMLLM
from labkit.models.official_checkpoint import PAPER_FILES
from labkit.models.paper_weights import LLAMA, load_llama
from labkit.training.loop import Schedule
from labkit.training.sharding import full_state_dict

TOKENIZER_JSON = f"{LLAMA}/tokenizer.json"
ADDED_TOKENS = PAPER_FILES["agent"][1]  # the release's cvlm_llama2_tokenizer/added_tokens.json (the 66 ids)
PARTS = ("llama", "visual_tokenizer")
ADAPTER = "adapter_model.safetensors"  # what peft's save_pretrained writes
SCHEDULES = {
    # a smoke run on the real weights (minutes on 8 GPUs): 16 samples per step in all
    "quick": Schedule(steps=300, batch_size=16, lr=1e-4, warmup=30, checkpoint_every=100, eval_every=100),
    # scripts/sft_storystream.sh with configs/data/george_sft.yaml: 30 per GPU x 8 GPUs = 240 per step, 6000 steps
    # (checkpoints every 1000 steps rather than 3000: a 13 GB body is in each, but a lost day costs more)
    "reference": Schedule(steps=6000, batch_size=240, lr=1e-4, warmup=100, checkpoint_every=1000, eval_every=1000),
}


def require_lora_weights(folder: Path) -> None:
    """Every file stage 2 reads at the paper preset, checked before any work; one error lists all that are missing
    (`PAPER_FILES`' Llama and ViT parts, and the release's added-token ids)."""
    relatives = [*(relative for part in PARTS for relative in PAPER_FILES[part]), ADDED_TOKENS]
    missing = [str(folder / relative) for relative in relatives if not (folder / relative).is_file()]
    if missing:
        listing = "\n  ".join(missing)
        raise LabError(
            f"stage 2 at the paper preset needs local files that are missing under {folder}:\n  {listing}\n"
            "(Llama-2-7b-hf as its Hugging Face repo lays it out, the release's "
            "cvlm_llama2_tokenizer/added_tokens.json and the extracted Qwen-VL ViT; nothing is downloaded)"
        )


def lora_tokenizer(folder: Path) -> LlamaStoryTokenizer:
    """Llama-2's tokenizer + the release's added tokens (`configs/tokenizer/clm_llama_tokenizer.yaml`)."""
    return LlamaStoryTokenizer.from_files(folder / TOKENIZER_JSON, folder / ADDED_TOKENS)


def save_tokenizer_files(source: Path, folder: Path) -> None:
    """Copy the two files the tokenizer is read from, so the artifact reads it back without the weights folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for relative in (TOKENIZER_JSON, ADDED_TOKENS):
        shutil.copyfile(source / relative, folder / Path(relative).name)


def load_tokenizer_files(folder: Path) -> LlamaStoryTokenizer:
    return LlamaStoryTokenizer.from_files(folder / Path(TOKENIZER_JSON).name, folder / Path(ADDED_TOKENS).name)


def build_lora_mllm(
    preset: Preset, tokenizer: LlamaStoryTokenizer, folder: Path, seed: int, device: torch.device | None = None
) -> SeedStoryMLLM:
    """The MLLM to train: the pretrained body, frozen, under peft LoRA (`apply_lora`, the released config), fresh
    resamplers, gradient checkpointing on (as `train_clm_sft.py`). `device`: where the body is loaded (a CUDA run
    passes this process's GPU: `PartialState().device`)."""
    torch.manual_seed(seed)  # the resamplers, the new embedding rows and LoRA's A matrices
    body = load_llama(folder, preset, tokenizer.vocab_size, device or torch.device("cpu"), torch.float32)
    model = SeedStoryMLLM(preset, tokenizer.vocab_size, llm=body).to(body.device)
    # non-reentrant: works with DDP and with inputs (the resampled image slots) that carry gradients
    model.causal_lm.activation_checkpointing_enable({"use_reentrant": False})
    return model


def lora_digest(model: SeedStoryMLLM) -> str:
    """SHA-256 of every trained tensor (LoRA's A and B, the norms' trainable copies, the embedding and the head; both
    resamplers), in name order: equal digests, equal weights. Read from the gathered state dict: under FSDP each
    process holds shards only (so every process must call this)."""
    trained = {f"llm.{name}" for name, p in model.llm.named_parameters() if p.requires_grad}
    state = full_state_dict(model)
    tensors = {k: v for k, v in state.items() if k in trained or k.startswith(("input_resampler.", "output_"))}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def replica_digests(model: SeedStoryMLLM) -> list[str]:
    """Each process's `lora_digest`, in process order (every process must call it): data-parallel replicas that
    drifted apart (a gradient that was not all-reduced) show as different digests."""
    digest = lora_digest(model)
    return gather_object([digest]) if PartialState().num_processes > 1 else [digest]


def process_state(run_device: torch.device) -> PartialState:
    """This process's place in the launch (`accelerate launch` / `torchrun` set it), started as the training loop's
    `Accelerator` will start it: `device` is this process's own GPU in a CUDA run, else the CPU."""
    return PartialState(cpu=run_device.type == "cpu")


def save_lora_llm(model: SeedStoryMLLM, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """peft's adapter folder: LoRA, the norms' copies and (`save_embedding_layers`) the resized embedding and head.
    `state`: the MLLM's state dict, gathered (`labkit.training.sharding.full_state_dict`) when FSDP sharded it."""
    llm_state = None if state is None else {k.removeprefix("llm."): v for k, v in state.items() if k.startswith("llm.")}
    model.llm.save_pretrained(folder, state_dict=llm_state, save_embedding_layers=True)


def load_lora_mllm(artifact: Path, preset: Preset, tokenizer: LlamaStoryTokenizer, folder: Path) -> SeedStoryMLLM:
    """The body from the weights folder, then the artifact's adapter (`llm/`) on top; resamplers are the caller's."""
    model = build_lora_mllm(preset, tokenizer, folder, seed=0)
    path = artifact / "llm" / ADAPTER
    if not path.is_file():
        raise LabError(f"{path}: not found (an MLLM artifact trained with LoRA holds its adapter there)")
    result = set_peft_model_state_dict(model.llm, load_file(str(path)))
    if result.unexpected_keys:
        raise LabError(f"{path}: keys that fit no LoRA module: {sorted(result.unexpected_keys)[:6]}")
    return model
