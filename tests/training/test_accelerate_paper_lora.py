"""The paper preset's stage 2 (LoRA on a frozen Llama) on two CPU processes (DDP over gloo), then resumed on one.

A paper-shaped random Llama is written in the official folder layout (`save_pretrained`, sharded, with its
`tokenizer.json`), next to the release's `added_tokens.json` and a Qwen-VL-layout ViT, and trained by the same
`train_stage2` that `labkit train stage2 --preset paper` runs (`labkit.training.paper_shaped`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from labkit.core.paths import artifacts_folder, project_root
from labkit.data.frames import load_frames
from labkit.data.llama_tokenizer import added_tokens, llama_format_tokenizer
from labkit.models.mllm import llm_config
from labkit.models.visual_tokenizer import VisualTokenizer
from labkit.training.loop import CHECKPOINT
from labkit.training.paper_shaped import paper_shaped_preset
from labkit.training.stage2 import load_mllm
from labkit.training.stage2_lora import lora_digest

pytestmark = pytest.mark.slow  # launches processes and trains: `make test` runs it, `make test-fast` does not

SAMPLE = project_root() / "data_samples" / "storystream-mini"
STEPS, STOP = 4, 2


def write_shaped_weights(folder):
    """A small random Llama-2 folder (config, sharded safetensors + index, tokenizer.json), the release's
    added_tokens.json, and a ViT state dict at visual_tokenizer/qwen_vit_G.pt; returns the preset they fit."""
    captions = [c for story in load_frames(SAMPLE, "train").captions for c in story]
    tokenizer = llama_format_tokenizer(captions, merges=200)
    base = tokenizer.get_vocab_size(with_added_tokens=True)
    preset = paper_shaped_preset(base)
    llama = folder / "Llama-2-7b-hf"
    torch.manual_seed(0)
    body = LlamaForCausalLM(llm_config(preset, base))
    body.save_pretrained(llama, max_shard_size="100KB")  # sharded, with model.safetensors.index.json, as the repo
    tokenizer.save(str(llama / "tokenizer.json"))
    added = folder / "cvlm_llama2_tokenizer" / "added_tokens.json"
    added.parent.mkdir(parents=True)
    added.write_text(json.dumps(added_tokens(base, preset.data.image_tokens)))
    (folder / "visual_tokenizer").mkdir()
    torch.save(VisualTokenizer(preset.visual_tokenizer).state_dict(), folder / "visual_tokenizer" / "qwen_vit_G.pt")
    return preset


def launch(processes: int, out, result, weights, stop_after: int | None = None) -> None:
    """`torchrun --standalone --nproc_per_node N` (as the official `scripts/sft_storystream.sh`): Accelerate reads
    the ranks from its environment and, on the CPU, joins them with gloo. Not `accelerate launch --cpu
    --num_processes 2`: without mpirun that starts a single process (accelerate 1.x, `simple_launcher`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += ["-m", "labkit.training.paper_shaped", "--data", str(SAMPLE), "--out", str(out)]
    command += ["--steps", str(STEPS), "--result", str(result)]
    command += ["--stop-after", str(stop_after)] if stop_after else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LABKIT_WEIGHTS": str(weights)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    first = done.stderr.find("Traceback")  # a worker's own traceback comes before torchrun's summary of it
    assert done.returncode == 0, done.stderr[first : first + 4000] if first >= 0 else done.stderr[-4000:]


def test_two_processes_agree_and_one_process_resumes_their_checkpoint(tmp_path, monkeypatch):
    weights, out = tmp_path / "weights", tmp_path / "mllm"
    preset = write_shaped_weights(weights)
    try:
        launch(2, out, tmp_path / "two.json", weights, stop_after=STOP)
        two = json.loads((tmp_path / "two.json").read_text())
        assert two["interrupted_at"] == STOP
        digests = two["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], "the two ranks' LoRA weights differ"
        checkpoint = tmp_path / ".mllm.run" / CHECKPOINT
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }

        launch(1, out, tmp_path / "one.json", weights)  # the same command on one process: resumes at step 2
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["resumed_from_step"] == STOP
        assert [h["step"] for h in manifest["history"]] == list(range(1, STEPS + 1))
        assert manifest["replica_digests"] != digests  # it trained on after the checkpoint
        # the artifact: resamplers, peft adapter, tokenizer files; not the Llama body
        assert (out / "llm" / "adapter_config.json").is_file() and not (out / "llm" / "config.json").exists()
        monkeypatch.setenv("LABKIT_WEIGHTS", str(weights))
        model, tokenizer, _ = load_mllm(out, preset)
        assert tokenizer.vocab_size == preset.mllm.llm.base_vocab + 66
        assert lora_digest(model) == manifest["replica_digests"][0]
        assert model.causal_lm.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (
            16,
            preset.mllm.llm.hidden_size,
        )
    finally:
        shutil.rmtree(artifacts_folder(preset.name), ignore_errors=True)  # the ViT feature cache of this run
