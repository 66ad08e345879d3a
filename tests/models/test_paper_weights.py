"""The real-weights inference path (`labkit story --preset paper`), run end to end on random weights written in the
official file layout and key names at reduced sizes (`labkit.models.official_layout`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import labkit.data.storystream_mini as storystream_mini
from labkit.cli.main import main
from labkit.core.errors import LabError
from labkit.core.paths import project_root
from labkit.data.text_tokenizer import BOI, EOI, image_token
from labkit.inference.generate import STRATEGIES, generate_story
from labkit.models.official_checkpoint import PAPER_FILES, map_official_keys, read_state
from labkit.models.official_layout import LayoutSizes, official_agent_state, write_official_layout
from labkit.models.paper_weights import STORY_PARTS, blank_features, load_paper_models, paper_files, read_sizes
from labkit.models.visual_tokenizer import convert_qwen_state_dict

CAPTION = "Once upon a time, George found a shiny key under the old tree."
CAPTION_TOKENS, SEGMENTS, WINDOW, SINK = 4, 5, 40, 4
KEEP = 2  # images (mm-sink-as-coded) and segments (recompute-window) kept: fewer than SEGMENTS, so both evict


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return write_official_layout(tmp_path_factory.mktemp("weights") / "pretrained")


@pytest.fixture(scope="module")
def models(layout):
    return load_paper_models(layout, "cpu")


@pytest.fixture()
def opening_png(tmp_path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "first.png")
    return tmp_path / "first.png"


def test_the_layout_has_the_official_files_and_key_names(layout):
    for part in PAPER_FILES.values():
        for relative in part:
            assert (layout / relative).is_file(), relative
    agent = read_state(layout / PAPER_FILES["agent"][0])
    prefix = "llm.base_model.model.model.layers.0"
    assert {  # peft 0.4: the frozen weight at q_proj.weight, beside lora_A/lora_B; the xformers Llama's inv_freq
        f"{prefix}.self_attn.q_proj.weight",
        f"{prefix}.self_attn.q_proj.lora_A.default.weight",
        f"{prefix}.mlp.down_proj.lora_B.default.weight",
        f"{prefix}.input_layernorm.modules_to_save.default.weight",
        f"{prefix}.self_attn.rotary_emb.inv_freq",
        "llm.base_model.model.lm_head.weight",
        "input_resampler.pos_embed",
        "output_resampler.query",
    } <= set(agent)
    assert not any(".base_layer." in key for key in agent)
    vit = read_state(layout / PAPER_FILES["visual_tokenizer"][0])
    assert {"conv1.weight", "positional_embedding", "transformer.resblocks.1.attn.in_proj.weight", "proj"} <= set(vit)
    assert "attn_pool.pos_embed" in vit and vit["positional_embedding"].shape[0] == 256  # Qwen-VL's 16 x 16 table
    adapter = read_state(layout / PAPER_FILES["detokenizer_adapted"][0])
    assert {k.split(".")[0] for k in adapter} == {
        "resampler",
        "unet",
    } and "resampler.unet_attnpool.c_proj.weight" in adapter
    index = json.loads((layout / "Llama-2-7b-hf/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # sharded, as the Hugging Face repo
    added = json.loads((layout / PAPER_FILES["agent"][1]).read_text())
    base = json.loads((layout / "Llama-2-7b-hf/config.json").read_text())["vocab_size"]
    q = LayoutSizes().num_queries
    assert added == {**{image_token(i): base + i for i in range(q)}, BOI: base + q, EOI: base + q + 1}


def test_sizes_are_read_from_the_files(layout):
    sizes = read_sizes(layout)
    base = json.loads((layout / "Llama-2-7b-hf/config.json").read_text())["vocab_size"]
    written = LayoutSizes().preset(base)
    assert sizes.mllm == written.mllm and sizes.visual_tokenizer == written.visual_tokenizer
    assert sizes.detokenizer == written.detokenizer and sizes.data.image_tokens == LayoutSizes().num_queries


def test_every_released_weight_is_placed(layout, models):
    report = models.report
    assert report["agent"]["unexpected"] == [] and report["agent"]["from_llama_only"] == 0
    assert report["detokenizer"]["unexpected"] == [] and report["detokenizer"]["missing_resampler"] == []
    ours = models.mllm.state_dict()
    mapped, unplaced = map_official_keys(read_state(layout / PAPER_FILES["agent"][0]), set(ours))
    assert unplaced == [] and set(mapped) == set(ours)
    assert all(torch.equal(ours[key], value) for key, value in mapped.items())
    qwen, _ = convert_qwen_state_dict(read_state(layout / PAPER_FILES["visual_tokenizer"][0]))
    assert all(torch.equal(models.visual_tokenizer.state_dict()[k], v) for k, v in qwen.items())
    adapter = read_state(layout / PAPER_FILES["detokenizer_adapted"][0])
    detokenizer = models.detokenizer.state_dict()
    assert all(torch.equal(detokenizer[k], v) for k, v in adapter.items())
    assert torch.equal(models.detokenizer.negative_features, blank_features(models.visual_tokenizer)[0])
    t = models.tokenizer
    assert (t.vocab_size, len(t.image_token_ids), len(t.inst_ids)) == (
        models.mllm.causal_lm.config.vocab_size,
        LayoutSizes().num_queries,
        len(t.encode("[INST]")),
    )
    assert len(t.inst_ids) > 1  # plain text, as in Llama-2: several pieces


def _params(policy: str, models) -> dict:
    t = models.tokenizer
    image = {"num_image_tokens": models.mllm.num_queries, "boi_id": t.boi_id, "eoi_id": t.eoi_id}
    return {
        "dense": {},
        "window": {"window": WINDOW},
        "sink": {"window": WINDOW, "sink": SINK},
        "mm-sink": {"window": WINDOW, "sink": SINK, "cap": 200, **image},
        "mm-sink-stale": {"window": WINDOW, "sink": SINK, "cap": 200, **image},
        "mm-sink-as-coded": {"window_images": KEEP, **image},
        "mm-sink-as-coded-rerotated": {"window_images": KEEP, **image},
        "recompute-window": {},
    }[policy]


@pytest.mark.slow
def test_every_policy_writes_and_draws_a_story(models):
    features = torch.randn(models.preset.visual_tokenizer.num_features, models.preset.visual_tokenizer.feature_dim)
    runs = {
        policy: generate_story(
            models.mllm,
            models.tokenizer,
            CAPTION,
            features,
            SEGMENTS,
            policy,
            _params(policy, models),
            recompute_segments=KEEP,
            max_caption_tokens=CAPTION_TOKENS,
            fixed_caption_tokens=True,
        )
        for policy in STRATEGIES
    }
    q, t = models.mllm.num_queries, models.tokenizer
    opening = 1 + len(t.encode(CAPTION)) + q + 2
    segment = len(t.inst_ids) + CAPTION_TOKENS + q + 2
    told = [opening + k * segment for k in range(SEGMENTS)]  # tokens of the story after each segment
    entries = {policy: [step.kv_entries for step in run.steps] for policy, run in runs.items()}
    assert all(len(run.token_ids) == told[-1] and len(run.captions) == SEGMENTS for run in runs.values())
    assert entries["dense"] == told
    assert entries["window"] == [min(n, WINDOW) for n in told]
    assert entries["sink"] == [min(n, SINK + WINDOW) for n in told]
    assert entries["mm-sink"] == entries["mm-sink-stale"] and entries["sink"][-1] < entries["mm-sink"][-1] <= 200
    assert entries["mm-sink-as-coded"] == entries["mm-sink-as-coded-rerotated"]
    assert entries["mm-sink-as-coded"][-1] < told[-1] and entries["recompute-window"][-1] < told[-1]
    assert torch.equal(runs["window"].features[0], features)
    assert not torch.allclose(runs["window"].features[-1], runs["dense"].features[-1])  # eviction changed it
    for policy, run in runs.items():
        images = models.detokenizer.sample(torch.stack(run.features), steps=2, guidance_scale=7.5, seed=42)
        assert images.shape == (SEGMENTS, 3, 64, 64) and images.dtype == torch.uint8, policy
        assert images.float().std() > 0, policy


@pytest.mark.slow
def test_labkit_story_writes_the_story_folder(layout, opening_png, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABKIT_WEIGHTS", str(layout))
    out = tmp_path / "story"
    args = ["story", "--preset", "paper", "--policy", "window", "--segments", str(SEGMENTS), "--out", str(out)]
    args += ["--image", str(opening_png), "--caption", CAPTION, "--window", str(WINDOW), "--steps", "2"]
    assert main([*args, "--max-caption-tokens", str(CAPTION_TOKENS), "--fixed-caption-tokens", "--quiet"]) == 0
    assert f"wrote {out}: {SEGMENTS} segments under window" in capsys.readouterr().out
    record = json.loads((out / "story.json").read_text())
    assert record["params"] == {"window": WINDOW} and len(record["captions"]) == SEGMENTS
    assert record["captions"][0] == CAPTION and record["opening"]["image"] == str(opening_png)
    assert [step["kv_entries"] for step in record["steps"]][-1] == WINDOW  # evicted down to the window
    assert record["weights"]["agent"]["unexpected"] == [] and record["detokenizer"]["steps"] == 2
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"segment_{k:02d}.png" for k in range(1, SEGMENTS + 1)]
    assert Image.open(out / "images" / "segment_05.png").size == (64, 64)
    assert Image.open(out / "strip.png").size == (64 * 2, 64)  # segments 1 and the last (5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png", "story"]  # no temporary folder left


@pytest.mark.slow
def test_labkit_story_tiny_starts_from_the_first_test_story(tmp_path, monkeypatch, capsys):
    sample = project_root() / "data_samples" / "storystream-mini"
    monkeypatch.setattr(storystream_mini, "ensure_dataset", lambda preset, progress=True: sample)
    out = tmp_path / "tiny"
    assert main(["story", "--policy", "mm-sink", "--segments", "3", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "story.json").read_text())
    first = json.loads((sample / "test.jsonl").read_text().splitlines()[0])
    assert record["captions"][0] == first["captions"][0] and record["opening"]["image"].startswith("test story")
    assert len(record["steps"]) == 3 and (out / "images" / "segment_03.png").is_file()


def test_missing_weights_are_all_listed_and_exit_2(tmp_path, opening_png, monkeypatch, capsys):
    weights = tmp_path / "pretrained"
    (weights / "Llama-2-7b-hf").mkdir(parents=True)
    (weights / "Llama-2-7b-hf" / "config.json").write_text("{}")
    (weights / "Llama-2-7b-hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    monkeypatch.setenv("LABKIT_WEIGHTS", str(weights))
    out = tmp_path / "story"
    args = ["story", "--preset", "paper", "--out", str(out), "--image", str(opening_png), "--caption", CAPTION]
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = [relative for part in STORY_PARTS for relative in PAPER_FILES[part]]
    expected += ["Llama-2-7b-hf/model-00001-of-00002.safetensors", "Llama-2-7b-hf/model-00002-of-00002.safetensors"]
    missing = [relative for relative in expected if relative not in ("Llama-2-7b-hf/config.json",)]
    missing.remove("Llama-2-7b-hf/model.safetensors.index.json")
    assert all(str(weights / relative) in err for relative in missing), err
    assert str(weights / "Llama-2-7b-hf/config.json") not in err and "Traceback" not in err and not out.exists()
    with pytest.raises(LabError, match="model-00002-of-00002.safetensors"):
        paper_files(weights, ("llama",))
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(args) == 2  # a non-empty --out is refused before anything loads
    assert "already exists and is not empty" in capsys.readouterr().err and (out / "mine.txt").is_file()


@pytest.mark.parametrize(
    "change, parameter",
    [
        (["--policy", "lru"], "parameter policy: unknown policy 'lru'"),
        (["--image", "nowhere.png"], "parameter --image: nowhere.png: not found"),
        (["--caption", None], "parameter --image/--caption"),
        (["--segments", "1"], "parameter segments: must be >= 2"),
        (["--device", "tpu"], "parameter --device: unknown device 'tpu'"),
        (["--image", __file__], "test_paper_weights.py: cannot read an image"),
    ],
)
def test_bad_story_parameters_exit_2_naming_them(tmp_path, opening_png, capsys, change, parameter):
    args = {"--preset": "paper", "--out": str(tmp_path / "s"), "--image": str(opening_png), "--caption": CAPTION}
    args.update(dict(zip(change[::2], change[1::2])))
    assert main(["story", *[x for k, v in args.items() if v is not None for x in (k, v)]]) == 2
    err = capsys.readouterr().err
    assert parameter in err and "Traceback" not in err


def _with_agent(layout: Path, folder: Path, edit) -> Path:
    """A copy of the layout (links) whose agent file is `edit(state)`."""
    shutil.copytree(layout, folder, copy_function=os.symlink)
    agent = folder / PAPER_FILES["agent"][0]
    state = dict(read_state(agent))
    agent.unlink()
    torch.save(edit(state), agent)
    return folder


@pytest.mark.slow
def test_a_released_key_that_finds_no_place_is_an_error_and_a_foreign_one_a_warning(layout, models, tmp_path):
    lora = next(key for key in official_agent_state(models.mllm) if ".lora_A." in key)
    renamed = _with_agent(
        layout,
        tmp_path / "renamed",
        lambda s: {**{k: v for k, v in s.items() if k != lora}, lora.replace("lora_A", "lora_a"): s[lora]},
    )
    with pytest.raises(LabError, match=r"1 weights not provided .*lora_A.*1 released keys not placed .*lora_a"):
        load_paper_models(renamed, "cpu")
    foreign = _with_agent(layout, tmp_path / "foreign", lambda s: {**s, "vit_down.weight": torch.zeros(2)})
    with pytest.warns(UserWarning, match=r"1 released keys were not used: \['vit_down.weight'\]"):
        assert load_paper_models(foreign, "cpu").report["agent"]["unexpected"] == ["vit_down.weight"]
