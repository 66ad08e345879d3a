"""LM pre-training: the language model stage 2 starts from (`labkit train lm`).

The paper's MLLM starts from pretrained Llama-2-7B (§3.2) and keeps its weights behind LoRA; the sinks a
pretrained LLM carries are what the paper's multimodal attention sink (§3.2, Fig. 4) keeps. The tiny Llama is
pre-trained here, on the lab's own text (`labkit.data.lm_corpus`: story captions and descriptions plus a share
of Bigram-Backcopy), with the optimiser settings that the lab's sink study found to grow a BOS sink (learning
rate 3e-3, weight decay 0.1, Gu et al. 2025; `labkit.experiments.sink_emergence`). Stage 2 then fine-tunes the
whole model at `tiny`.

The artifact is a plain transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`) plus the
lab's manifest, so `LlamaForCausalLM.from_pretrained("checkpoints/tiny/lm")` loads it without labkit.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from labkit.core.artifacts import config_hash, load_artifact, save_artifact
from labkit.core.errors import ParameterError
from labkit.core.presets import Preset
from labkit.data.descriptions import describe_split
from labkit.data.lm_corpus import CorpusConfig, LMCorpus, story_documents
from labkit.data.storystream_mini import load_tokenizer, open_split
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.inference.attention import SINK_SKIP, plain_bos_ratios
from labkit.models.mllm import llm_config
from labkit.training.common import StageRun, base_manifest, prepare_workdir
from labkit.training.loop import Schedule

NAME = "lm"
SEED = 5
# Measured (issue 13): with half the rows story text, the BOS ratio on captions peaked at 4.2x uniform (step 200)
# and fell to 3.3x by step 400; Bigram-Backcopy alone held 25x. The reference pre-trains on Bigram-Backcopy only
# and leaves the story language to stage 2; `--backcopy-share` brings the story text back.
BACKCOPY_SHARE = 1.0
# The sink levers (lr 3e-3, weight decay 0.1) with the sink study's plain AdamW: default betas, no clipping and a
# constant learning rate after warm-up (min_lr_ratio 1), as in the runs where the sink grew.
_LEVERS = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0, min_lr_ratio=1.0)
SCHEDULES = {
    "quick": Schedule(steps=200, batch_size=8, warmup=20, checkpoint_every=50, eval_every=100, **_LEVERS),
    "reference": Schedule(steps=1600, batch_size=8, warmup=20, checkpoint_every=100, eval_every=200, **_LEVERS),
}


def lm_config_hash(preset: Preset, vocab_size: int) -> str:
    return config_hash({"llm": asdict(preset.mllm.llm), "vocab_size": vocab_size})


def caption_probe(tokenizer: StoryTokenizer, captions: list[list[str]], stories: int = 8, length: int = 256):
    """Test-time probe: the first `stories` stories' captions as plain text after `<s>` ([stories, length])."""
    documents = story_documents(tokenizer, captions[:stories])
    rows = [(d + [tokenizer.pad_id] * length)[:length] for d in documents]
    return torch.tensor(rows)


def load_lm(folder: Path | str, preset: Preset) -> tuple[LlamaForCausalLM, StoryTokenizer, dict]:
    """The pre-trained language model, its tokenizer and manifest (refused if made for other sizes)."""
    tokenizer = StoryTokenizer.from_pretrained(folder)
    state, manifest = load_artifact(folder, NAME, preset.name, lm_config_hash(preset, tokenizer.vocab_size))
    model = LlamaForCausalLM(llm_config(preset, tokenizer.vocab_size))
    model.load_state_dict(state)
    return model.eval(), tokenizer, manifest


def train_lm(run: StageRun, backcopy_share: float = BACKCOPY_SHARE, seed: int = SEED) -> dict:
    """Pre-train the Llama body on the lab's corpus; write a transformers folder + manifest; return the manifest."""
    preset = run.preset
    if isinstance(backcopy_share, bool) or not isinstance(backcopy_share, (int, float)) or not 0 <= backcopy_share <= 1:
        raise ParameterError("--backcopy-share", f"must be a number in [0, 1], got {backcopy_share!r}")
    plan = run.plan(SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(NAME)
    corpus_config = CorpusConfig(backcopy_share=backcopy_share, seed=seed)
    prepare_workdir(
        workdir,
        {"stage": NAME, "preset": preset.name, "plan": asdict(plan), "corpus": asdict(corpus_config), "seed": seed},
        run.resume,
    )
    start = time.perf_counter()
    tokenizer = load_tokenizer(data_root)
    train_captions = [list(record.captions) for record in open_split(data_root, "train").records]
    documents = story_documents(tokenizer, train_captions, describe_split(data_root, "train"))
    corpus = LMCorpus(tokenizer, documents, corpus_config)
    val_captions = [list(record.captions) for record in open_split(data_root, "val").records]
    captions = caption_probe(tokenizer, val_captions)
    backcopy = corpus.batch(-1, range(4))

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llm_config(preset, tokenizer.vocab_size))
    model.config.pad_token_id, model.config.bos_token_id = tokenizer.pad_id, tokenizer.bos_id

    def loss_fn(m, batch):
        batch = batch.to(next(m.parameters()).device)
        return m(input_ids=batch, labels=batch.masked_fill(batch == tokenizer.pad_id, -100), use_cache=False).loss, {}

    def evaluate(m) -> dict:
        on_captions = plain_bos_ratios(m, captions, tokenizer.pad_id)["mean_over_heads"]
        on_backcopy = plain_bos_ratios(m, backcopy, tokenizer.pad_id)["mean_over_heads"]
        with torch.no_grad():
            nll = float(loss_fn(m, captions)[0])
        return {
            "val_caption_nll": nll,
            "bos_ratio_captions_max": max(on_captions),
            "bos_ratio_backcopy_max": max(on_backcopy),
        }

    initial = evaluate(model)
    result = run.fit(
        model, corpus.batch, loss_fn, plan, workdir, evaluate=evaluate, desc=f"LM pre-training ({run.schedule})"
    )
    if run.interrupted(plan):
        return {"interrupted_at": run.stop_after}
    model.eval()
    manifest = {
        "stage": NAME,
        "name": NAME,
        **base_manifest(run, NAME, plan, seed, data_root),
        "corpus": asdict(corpus_config),
        "config_hash": lm_config_hash(preset, tokenizer.vocab_size),
        "vocab_size": tokenizer.vocab_size,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "metrics": {"step0": initial, "final": evaluate(model)},
        # the sink after pre-training, per layer, on validation captions as plain text and on Bigram-Backcopy
        "bos_ratio": {
            "skip": SINK_SKIP,
            "captions": plain_bos_ratios(model, captions, tokenizer.pad_id),
            "backcopy": plain_bos_ratios(model, backcopy, tokenizer.pad_id),
        },
        "history": [
            {k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
            for h in result.history
            if "val_caption_nll" in h or h["step"] % 20 == 0
        ],
    }

    def transformers_files(folder: Path) -> None:
        model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    if result.is_main_process:
        save_artifact(out, model.state_dict(), manifest, half=run.schedule == "reference", extra=transformers_files)
    return manifest
