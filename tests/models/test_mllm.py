"""The SEED-Story MLLM: layout-aware forward, losses, paper-size counts, official key names, training loop."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from labkit.core.errors import LabError
from labkit.core.presets import LLMPreset, LoraPreset, get_preset
from labkit.data.layout import build_layout
from labkit.data.sampler import random_length_sample
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.models.mllm import SeedStoryMLLM, collate, cosine_loss, paper_vocab_size, parameter_counts
from labkit.models.official_checkpoint import load_official_agent, map_official_keys, require_paper_weights
from labkit.training.loop import Schedule, train
from labkit.training.stage2 import StoryChunks, evaluate, make_batch_fn, validation_batches

CAPTIONS = [f"Mira walks to the forest {i}, and she finds a key." for i in range(10)]


def micro_preset(lora: bool = False):
    """The tiny preset shrunk further so tests run in a blink."""
    tiny = get_preset("tiny")
    llm = LLMPreset(
        hidden_size=32, layers=2, heads=2, kv_heads=2, intermediate_size=64, max_positions=2048, base_vocab=0
    )
    mllm = dataclasses.replace(
        tiny.mllm,
        llm=llm,
        num_queries=4,
        resampler_heads=2,
        output_heads=2,
        lora=LoraPreset(r=2, alpha=4, dropout=0.0) if lora else None,
    )
    vt = dataclasses.replace(tiny.visual_tokenizer, num_features=4, feature_dim=8, pool_heads=2)
    return dataclasses.replace(tiny, name="micro", mllm=mllm, visual_tokenizer=vt)


@pytest.fixture(scope="module")
def tokenizer():
    return StoryTokenizer.train(CAPTIONS, merges=40, num_image_tokens=8)


def sample_batch(tokenizer, preset, seed=0, rows=3):
    rng = random.Random(seed)
    layouts, features = [], []
    for _ in range(rows):
        sample = random_length_sample(CAPTIONS, list(range(10)), rng)
        layouts.append(
            build_layout(sample.captions, tokenizer, preset.mllm.num_queries, sample.text_loss, sample.image_loss)
        )
        features.append(
            torch.randn(len(sample.captions), preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim)
        )
    return collate(layouts, features, tokenizer.pad_id), layouts, features


def test_context_features_fill_exactly_the_input_slots(tokenizer):
    preset = micro_preset()
    torch.manual_seed(0)
    model = SeedStoryMLLM(preset, tokenizer.vocab_size)
    batch, layouts, features = sample_batch(tokenizer, preset)
    assert batch.input_features.shape[0] == sum(len(f) - 1 for f in features)  # every image but the target
    assert batch.target_features.shape[0] == 3 and torch.equal(batch.target_features[0], features[0][-1])
    embeds = model.embed(batch.input_ids, batch.image_input, batch.input_features)
    slots = model.input_resampler(batch.input_features).reshape(-1, preset.mllm.llm.hidden_size)
    assert torch.allclose(embeds[batch.image_input], slots)
    plain = model.causal_lm.model.embed_tokens(batch.input_ids)
    assert torch.equal(embeds[~batch.image_input], plain[~batch.image_input])


@pytest.mark.slow
def test_losses_start_near_chance_and_fall_when_trained(tokenizer):
    preset = micro_preset()
    torch.manual_seed(0)
    model = SeedStoryMLLM(preset, tokenizer.vocab_size)
    batch, _, _ = sample_batch(tokenizer, preset)
    out = model(batch)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(float(tokenizer.vocab_size)))) < 1.0
    assert out.regressed.shape == batch.target_features.shape
    assert abs(float(out.rec_loss) - float(cosine_loss(out.regressed, batch.target_features))) < 1e-6
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model(batch)
    assert float(after.lm_loss) < 0.5 * float(out.lm_loss) and float(after.rec_loss) < 0.5 * float(out.rec_loss)


def test_collate_keeps_the_text_targets_and_padding_carries_none(tokenizer):
    preset = micro_preset()
    batch, layouts, _ = sample_batch(tokenizer, preset, rows=3)
    for row, layout in enumerate(layouts):
        assert int((batch.labels[row] != -100).sum()) == sum(layout.text_target)
        assert torch.all(batch.input_ids[row, len(layout) :] == tokenizer.pad_id)
        assert not batch.image_input[row, len(layout) :].any() and not batch.image_output[row, len(layout) :].any()


def test_paper_preset_counts_on_the_meta_device():
    preset = get_preset("paper")
    with torch.device("meta"):
        model = SeedStoryMLLM(preset, paper_vocab_size(preset))
    counts = parameter_counts(model)
    assert paper_vocab_size(preset) == 32066
    assert abs(counts["llm_body"]["total"] - 6.74e9) / 6.74e9 < 0.005  # Llama-2-7B, vocabulary 32066
    # LoRA r=16 on q/k/v/o (4096->4096) and gate/up (4096->11008), down (11008->4096), 32 layers:
    r, h, m = 16, 4096, 11008
    per_layer = 4 * r * (h + h) + 2 * r * (h + m) + r * (m + h)
    assert counts["lora"]["trainable"] == 32 * per_layer == 39_976_960
    # trainable: LoRA + the whole embedding and head + the 65 norms (modules_to_save), plus both resamplers
    assert counts["llm"]["trainable"] == 32 * per_layer + 2 * 32066 * h + 65 * h
    assert (
        counts["all"]["trainable"]
        == counts["llm"]["trainable"] + counts["input_resampler"]["total"] + counts["output_resampler"]["total"]
    )


def official_state(model) -> dict[str, torch.Tensor]:
    """A synthetic state dict in the released checkpoint's layout (peft 0.4: no `base_layer` in key names)."""
    state = {k.replace(".base_layer.", "."): torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    state["input_resampler.pos_embed"] = torch.zeros(4, 32)  # present in the release, rebuilt by us
    state["llm.base_model.model.model.some_future_module.weight"] = torch.zeros(1)
    return state


def test_official_checkpoint_layout_maps_onto_our_modules(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = SeedStoryMLLM(micro_preset(lora=True), tokenizer.vocab_size)
    assert any(".base_layer." in k for k in model.state_dict())
    assert any(k.startswith("input_resampler.attn.in_proj_weight") for k in model.state_dict())
    state = official_state(model)
    mapped, unplaced = map_official_keys(state, set(model.state_dict()))
    assert unplaced == ["llm.base_model.model.model.some_future_module.weight"]
    assert set(mapped) == set(model.state_dict())
    torch.save(state, tmp_path / "pytorch_model.bin")
    report = load_official_agent(model, tmp_path / "pytorch_model.bin")
    assert report["missing"] == [] and all(
        torch.all(v == 0.5) for v in model.state_dict().values() if v.is_floating_point()
    )


def test_missing_paper_weights_are_all_listed(tmp_path):
    (tmp_path / "Llama-2-7b-hf").mkdir()
    (tmp_path / "Llama-2-7b-hf" / "config.json").write_text("{}")
    with pytest.raises(LabError) as raised:
        require_paper_weights(tmp_path)
    message = str(raised.value)
    for missing in (
        "Llama-2-7b-hf/tokenizer.json",
        "seed_story/george_sft/pytorch_model.bin",
        "visual_tokenizer/qwen_vit_G.pt",
    ):
        assert str(tmp_path / missing) in message
    assert str(tmp_path / "Llama-2-7b-hf/config.json") not in message  # present, so not listed
    with pytest.raises(LabError, match="not found"):
        load_official_agent(SeedStoryMLLM(micro_preset(), 100), tmp_path / "nope.bin")


def _loop_fixture(tokenizer, preset):
    torch.manual_seed(0)
    n, d = preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim
    chunks = StoryChunks.from_split([CAPTIONS * 3] * 4, torch.randn(4, 30, n, d), 10)
    assert len(chunks.captions) == 12 and chunks.features.shape == (12, 10, n, d)
    return (
        chunks,
        make_batch_fn(chunks, tokenizer, preset, "random-length", seed=5),
        validation_batches(chunks, tokenizer, preset, 8, 4),
    )


def _fresh(preset, tokenizer):
    torch.manual_seed(1)
    return SeedStoryMLLM(preset, tokenizer.vocab_size)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_result(tokenizer, tmp_path):
    preset = micro_preset()
    chunks, make_batch, val = _loop_fixture(tokenizer, preset)
    schedule = Schedule(steps=8, batch_size=3, lr=3e-3, warmup=2, checkpoint_every=3, eval_every=4)
    loss = lambda m, b: (lambda o: (o.loss, {}))(m(b))  # noqa: E731
    straight = _fresh(preset, tokenizer)
    train(straight, make_batch, loss, schedule, tmp_path / "a", progress=False)
    interrupted = _fresh(preset, tokenizer)
    first = train(interrupted, make_batch, loss, schedule, tmp_path / "b", progress=False, stop_after=5)
    assert (
        first.history[-1]["step"] == 5
        and json.loads((tmp_path / "b/checkpoint/trainer_state.json").read_text())["step"] == 5
    )
    resumed_model = _fresh(preset, tokenizer)  # a new process would start from fresh weights, then load the checkpoint
    resumed = train(resumed_model, make_batch, loss, schedule, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 5 and resumed.history[-1]["step"] == 8
    a, b = evaluate(straight.eval(), val), evaluate(resumed_model.eval(), val)
    assert abs(a["val_ce"] - b["val_ce"]) < 1e-5 and abs(a["val_cosine_error"] - b["val_cosine_error"]) < 1e-5
    for (name, p), q in zip(straight.named_parameters(), resumed_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.slow
def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tokenizer, tmp_path, monkeypatch):
    import accelerate

    preset = micro_preset()
    _, make_batch, _ = _loop_fixture(tokenizer, preset)
    schedule = Schedule(steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2, eval_every=4)
    loss = lambda m, b: (lambda o: (o.loss, {}))(m(b))  # noqa: E731
    train(_fresh(preset, tokenizer), make_batch, loss, schedule, tmp_path, progress=False, stop_after=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    real = accelerate.Accelerator.save_state

    def crash(self, output_dir, **kwargs):
        real(self, output_dir, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", crash)
    with pytest.raises(OSError):
        train(_fresh(preset, tokenizer), make_batch, loss, schedule, tmp_path, progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    assert after == before  # still the step-2 checkpoint, byte for byte
    # no half-written folder left beside it (throughput.json is the interrupted first run's speed record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "throughput.json"]
