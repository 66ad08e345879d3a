"""Stage 3 at the paper preset (paper §3.3), on a paper-shaped preset: SDXL base + the released pretrained
de-tokenizer and a small Llama written as random weights in the official folder layout, the stage-2 LoRA artifact
trained on them for 2 steps, then `train_stage3` (what `labkit train stage3 --preset paper` calls) interrupted and
resumed, its artifact read back on the base."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from labkit.cli.main import main
from labkit.core.errors import LabError
from labkit.core.paths import artifacts_folder, project_root
from labkit.data.frames import load_frames
from labkit.data.llama_tokenizer import added_tokens, llama_format_tokenizer
from labkit.models.mllm import llm_config
from labkit.models.official_checkpoint import PAPER_FILES
from labkit.models.official_layout import qwen_state_dict, write_sdxl
from labkit.models.visual_tokenizer import VisualTokenizer
from labkit.training.common import StageRun
from labkit.training.paper_shaped import paper_shaped_preset
from labkit.training.stage2 import train_stage2
from labkit.training.stage3 import train_stage3
from labkit.training.stage3_paper import load_base, load_paper_stage3, require_stage3_weights

SAMPLE = project_root() / "data_samples" / "storystream-mini"


def write_weights(folder):
    """A paper-shaped Llama (config, safetensors, tokenizer.json), the release's added tokens, a Qwen-layout ViT at
    tiny's sizes, SDXL base's unet/vae/scheduler and both released de-tokenizers at a 64 px SDXL layout; returns the
    preset they fit (its own name: its caches under artifacts/ are this test's alone)."""
    captions = [c for story in load_frames(SAMPLE, "train").captions for c in story]
    tokenizer = llama_format_tokenizer(captions, merges=200)
    base = tokenizer.get_vocab_size(with_added_tokens=True)
    preset = replace(paper_shaped_preset(base), name="paper-shaped-stage3")
    torch.manual_seed(0)
    LlamaForCausalLM(llm_config(preset, base)).save_pretrained(folder / "Llama-2-7b-hf", max_shard_size="100KB")
    tokenizer.save(str(folder / "Llama-2-7b-hf" / "tokenizer.json"))
    added = folder / PAPER_FILES["agent"][1]
    added.parent.mkdir(parents=True)
    added.write_text(json.dumps(added_tokens(base, preset.data.image_tokens)))
    vit = folder / PAPER_FILES["visual_tokenizer"][0]
    vit.parent.mkdir(parents=True)
    torch.save(qwen_state_dict(VisualTokenizer(preset.visual_tokenizer)), vit)
    write_sdxl(folder, preset)
    return preset


def test_missing_weight_files_are_listed_before_any_work(tmp_path, monkeypatch, capsys):
    with pytest.raises(LabError) as error:
        require_stage3_weights(tmp_path)
    for relative in (PAPER_FILES["detokenizer_pretrained"][0], PAPER_FILES["sdxl"][1], "added_tokens.json"):
        assert relative in str(error.value)
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    assert main(["train", "stage3", "--preset", "paper", "--mode", "official", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stage 3 at the paper preset needs local files" in err and "Traceback" not in err


@pytest.mark.slow  # trains stage 2 and stage 3 (about 30 s on one CPU thread)
def test_official_mode_trains_resumes_and_saves_only_what_trains(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    preset = write_weights(weights)
    monkeypatch.setenv("LABKIT_WEIGHTS", str(weights))
    try:
        common = dict(data_root=SAMPLE, progress=False)
        train_stage2(StageRun(preset, steps=2, out=tmp_path / "mllm", **common))
        out = tmp_path / "official"
        options = dict(mode="official", sample_steps=2, mllm=tmp_path / "mllm")
        first = train_stage3(StageRun(preset, steps=3, out=out, stop_after=2, **common), **options)
        assert first == {"interrupted_at": 2} and not out.exists()
        manifest = train_stage3(StageRun(preset, steps=3, out=out, **common), **options)
        assert manifest["resumed_from_step"] == 2
        assert [h["step"] for h in manifest["history"]] == [1, 2, 3]
        assert "val_denoising_loss" in manifest["history"][-1]
        # no judges artifact for this preset: the judge-free metrics, and the manifest says so
        assert manifest["judges"].startswith("unavailable") and manifest["metrics"]["test"]["fid_analogue"] is None

        base, _ = load_base(preset, weights, negative=False)
        trained = load_file(str(out / "model.safetensors"))
        assert set(trained) == set(base.set_trainable("official"))  # the resampler and every to_k / to_v, no more
        assert all(k.startswith("resampler.") or k.endswith(("to_k.weight", "to_v.weight")) for k in trained)
        model, loaded = load_paper_stage3(out, preset, weights)
        assert loaded["mode"] == "official"
        start, after = base.state_dict(), model.state_dict()
        frozen = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        assert torch.equal(after[frozen], start[frozen])  # not to_k / to_v: bit-identical to SDXL + pretrained
        assert torch.equal(after["unet.conv_in.weight"], start["unet.conv_in.weight"])
        key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        assert not torch.equal(after[key], start[key]) and torch.equal(after[key], trained[key])
        assert not torch.equal(after["resampler.proj_in.weight"], start["resampler.proj_in.weight"])
        assert torch.count_nonzero(model.negative_features) > 0  # the blank frame's ViT features, saved with it
    finally:
        shutil.rmtree(artifacts_folder(preset.name), ignore_errors=True)  # this preset's feature caches
