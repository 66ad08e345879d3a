"""LM pre-training (`labkit train lm`): the corpus, the transformers folder it leaves, and stage 2 starting from it."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from labkit.cli.main import main
from labkit.core.errors import ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.data.lm_corpus import CorpusConfig, LMCorpus, backcopy_sequence, story_documents, successor_table
from labkit.data.storystream_mini import load_tokenizer, open_split
from labkit.training.common import StageRun
from labkit.training.lm import load_lm, train_lm
from labkit.training.stage2 import build_model, load_mllm, start_from_lm, train_stage2

TINY = get_preset("tiny")
SAMPLE = project_root() / "data_samples" / "storystream-mini"  # the committed tiny-preset sample


def test_backcopy_copies_the_token_before_every_trigger():
    triggers = [900, 901, 902, 903]
    ids = backcopy_sequence(random.Random(0), 400, 1, successor_table(64, 0), triggers)
    assert ids[0] == 1 and len(ids) == 400
    positions = [i for i, token in enumerate(ids[:-1]) if token in triggers]
    assert len(positions) > 10
    assert all(ids[i + 1] == ids[i - 1] for i in positions)


def test_corpus_rows_are_a_pure_function_of_step_and_row_and_mix_as_asked(small_dataset):
    tokenizer = load_tokenizer(small_dataset)
    captions = [list(r.captions) for r in open_split(small_dataset, "train").records]
    documents = story_documents(tokenizer, captions)
    corpus = LMCorpus(tokenizer, documents, CorpusConfig(length=64, backcopy_share=0.5))
    first, again = corpus.batch(3, range(16)), corpus.batch(3, range(16))
    assert torch.equal(first, again) and first.shape == (16, 64)
    assert (first[:, 0] == tokenizer.bos_id).all()
    with_triggers = sum(bool(set(row.tolist()) & set(corpus.triggers)) for row in first)
    assert 0 < with_triggers < 16  # some rows are Bigram-Backcopy, some are story text
    story_only = LMCorpus(tokenizer, documents, CorpusConfig(length=64, backcopy_share=0.0)).batch(3, range(16))
    for row in story_only.tolist():  # share 0: every row is `<s>` + a window of one document
        body = [t for t in row[1:] if t != tokenizer.pad_id]
        assert any(body == d[i : i + len(body)] for d in documents for i in range(len(d)))


@pytest.mark.parametrize("share", [-0.1, 1.5, "half", True])
def test_a_bad_backcopy_share_is_refused_before_any_work(share):
    with pytest.raises(ParameterError, match="--backcopy-share"):
        train_lm(StageRun(TINY, data_root="/nonexistent"), backcopy_share=share)


def test_cli_refuses_a_bad_share_with_exit_2(capsys):
    assert main(["train", "lm", "--backcopy-share", "2", "--data", "/nonexistent"]) == 2
    assert "--backcopy-share" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_folder_loads_with_plain_transformers_and_stage2_starts_from_it(tmp_path):
    lm_folder = tmp_path / "lm"
    manifest = train_lm(StageRun(TINY, steps=3, data_root=SAMPLE, out=lm_folder, progress=False))
    layers = TINY.mllm.llm.layers
    assert len(manifest["bos_ratio"]["captions"]["mean_over_heads"]) == layers
    assert (lm_folder / "tokenizer.json").is_file()
    plain = LlamaForCausalLM.from_pretrained(lm_folder)
    ours, _, _ = load_lm(lm_folder, TINY)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ours.state_dict().values()))

    mllm_folder = tmp_path / "mllm"
    stage2 = train_stage2(
        StageRun(TINY, steps=2, data_root=SAMPLE, out=mllm_folder, progress=False), lm_folder=lm_folder
    )
    assert stage2["language_model"]["config_hash"] == manifest["config_hash"]
    assert len(stage2["bos_ratio"]["captions_after_stage2"]["mean_over_heads"]) == layers
    model, _, _ = load_mllm(mllm_folder, TINY)
    saved = LlamaForCausalLM.from_pretrained(mllm_folder / "llm")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.causal_lm.state_dict().values()))


@pytest.mark.slow
def test_stage2_on_a_data_set_with_another_tokenizer_carries_the_shared_vocabulary(small_dataset, tmp_path):
    lm_folder = tmp_path / "lm"
    train_lm(StageRun(TINY, steps=2, data_root=small_dataset, out=lm_folder, progress=False))
    lm, lm_tokenizer, _ = load_lm(lm_folder, TINY)
    tokenizer = load_tokenizer(SAMPLE)  # the committed sample trained its own BPE: another vocabulary
    assert lm_tokenizer.tokenizer.to_str() != tokenizer.tokenizer.to_str()
    model = build_model(TINY, tokenizer)
    manifest = start_from_lm(model, TINY, tokenizer, lm_folder)
    shared = manifest["vocabulary"]["from_lm"]
    assert 0 < shared < tokenizer.vocab_size == manifest["vocabulary"]["rows"]
    body = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.causal_lm.state_dict()[body], lm.state_dict()[body])
    embed = model.causal_lm.model.embed_tokens.weight
    assert torch.equal(embed[tokenizer.bos_id], lm.model.embed_tokens.weight[lm_tokenizer.bos_id])
