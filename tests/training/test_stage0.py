"""Stage 0: the visual tokenizer (tiny and paper architectures, Qwen-VL weights), descriptions, contrastive loss,
training runs that write complete artifacts and resume exactly, features, and the judges."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import labkit.training.stage0 as stage0
from labkit.core.artifacts import MANIFEST, WEIGHTS, locate_artifact
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import VisualTokenizerPreset, get_preset
from labkit.data.descriptions import describe_frame
from labkit.data.storystream_mini import open_split
from labkit.data.storyworld import CHARACTERS, PROPS, SCENES
from labkit.models.contrastive import clip_loss, retrieval
from labkit.models.judges import augment, load_judges_artifact
from labkit.models.visual_tokenizer import VisualAttention, VisualTokenizer, count_parameters, load_qwen_vit
from labkit.training.common import StageRun

SAMPLE = project_root() / "data_samples" / "storystream-mini"
TINY = get_preset("tiny")
TINY_VT = TINY.visual_tokenizer


def tiny_tokenizer(seed: int = 0) -> VisualTokenizer:
    torch.manual_seed(seed)
    return VisualTokenizer(TINY_VT).eval()


# ---- the tokenizer ----------------------------------------------------------------------------------------------


def test_tiny_tokenizer_maps_images_to_n_by_d_features():
    model = tiny_tokenizer()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        features = model(images)
        assert features.shape == (3, TINY_VT.num_features, TINY_VT.feature_dim) == (3, 16, 64)
        assert model(torch.rand(2, 3, 32, 32)).shape == (
            2,
            16,
            64,
        )  # other sizes are resized, as the official transform
    with pytest.raises(ParameterError, match="images"):
        model(torch.rand(2, 64, 64))


def test_save_and_from_pretrained_round_trip_is_bit_identical(tmp_path):
    model = tiny_tokenizer(3)
    model.save_pretrained(tmp_path / "vt", {"preset": "tiny", "seed": 3})
    loaded = VisualTokenizer.from_pretrained(tmp_path / "vt", TINY)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    model.requires_grad_(False)  # as loaded: frozen (a frozen module may take other, equally exact, kernels)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_other_sizes_or_preset_are_refused_with_the_retrain_command(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "vt", {"preset": "tiny"})
    manifest = json.loads((tmp_path / "vt" / MANIFEST).read_text())
    (tmp_path / "vt" / MANIFEST).write_text(json.dumps({**manifest, "config_hash": "0123456789abcdef"}))
    rebuild = "labkit train stage0 --preset tiny --schedule reference"
    with pytest.raises(LabError, match=rf"config hash .* does not match.*{rebuild}"):
        VisualTokenizer.from_pretrained(tmp_path / "vt", TINY)
    with pytest.raises(LabError, match=r"preset 'tiny', not 'small'.*labkit train stage0 --preset small"):
        VisualTokenizer.from_pretrained(tmp_path / "vt", get_preset("small"))


def test_paper_vit_bigg_builds_on_meta_with_qwen_vl_parameter_count():
    config = get_preset("paper").visual_tokenizer
    with torch.device("meta"):
        model = VisualTokenizer(config)
    assert all(p.is_meta for p in model.parameters())
    # 48 blocks of 38.36M + patches 0.98M + positions 0.43M + attn_pool 75.0M + ln_post + proj 16.8M
    assert count_parameters(config) == 1_934_562_048
    assert model.blocks[0].mlp.c_fc.weight.shape == (8192, 1664) and model.positions.shape == (256, 1664)
    assert model.proj.shape == (4096, 4096) and model.attn_pool.query.shape == (256, 4096)


def test_attention_uses_qwen_vl_per_head_qkv_layout():
    """Qwen-VL's in_proj rows are [q|k|v] per head; permuted to nn.MultiheadAttention's layout, outputs agree."""
    torch.manual_seed(0)
    width, heads = 32, 4
    ours = VisualAttention(width, heads)
    reference = nn.MultiheadAttention(width, heads, batch_first=True)
    head_dim = width // heads
    rows = torch.arange(3 * width).view(heads, 3, head_dim)  # interleaved: head, (q, k, v), dim
    stacked = rows.permute(1, 0, 2).reshape(-1)  # all q, then all k, then all v
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.in_proj.weight[stacked])
        reference.in_proj_bias.copy_(ours.in_proj.bias[stacked])
        reference.out_proj.load_state_dict(ours.out_proj.state_dict())
        x = torch.randn(2, 9, width)
        torch.testing.assert_close(ours(x), reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def qwen_visual_state_dict(config: VisualTokenizerPreset) -> dict[str, torch.Tensor]:
    """A random state dict with the key names and shapes of Qwen-VL's `transformer.visual` (visual.py)."""
    w, m, d, p = config.width, config.mlp_width, config.feature_dim, config.patch_size
    shapes = {
        "conv1.weight": (w, 3, p, p),
        "positional_embedding": (256, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
    }
    for i in range(config.layers):
        block = f"transformer.resblocks.{i}."
        shapes.update(
            {
                block + "ln_1.weight": (w,),
                block + "ln_1.bias": (w,),
                block + "attn.in_proj.weight": (3 * w, w),
                block + "attn.in_proj.bias": (3 * w,),
                block + "attn.out_proj.weight": (w, w),
                block + "attn.out_proj.bias": (w,),
                block + "ln_2.weight": (w,),
                block + "ln_2.bias": (w,),
                block + "mlp.c_fc.weight": (m, w),
                block + "mlp.c_fc.bias": (m,),
                block + "mlp.c_proj.weight": (w, m),
                block + "mlp.c_proj.bias": (w,),
            }
        )
    n = config.num_features
    shapes.update(
        {
            "attn_pool.query": (n, d),
            "attn_pool.pos_embed": (n, d),
            "attn_pool.kv_proj.weight": (d, w),
            "attn_pool.attn.in_proj_weight": (3 * d, d),
            "attn_pool.attn.in_proj_bias": (3 * d,),
            "attn_pool.attn.out_proj.weight": (d, d),
            "attn_pool.attn.out_proj.bias": (d,),
            "attn_pool.ln_q.weight": (d,),
            "attn_pool.ln_q.bias": (d,),
            "attn_pool.ln_kv.weight": (d,),
            "attn_pool.ln_kv.bias": (d,),
            "ln_post.weight": (d,),
            "ln_post.bias": (d,),
            "proj": (d, d),
        }
    )
    generator = torch.Generator().manual_seed(0)
    return {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


# A small ViT whose 16x16 patch grid matches Qwen-VL's 256-entry position table,
# as at 448 px / patch 14 (32x32 -> resized).
QWEN_LIKE = VisualTokenizerPreset(
    image_size=64,
    patch_size=4,
    width=32,
    layers=2,
    heads=4,
    mlp_width=64,
    num_features=16,
    feature_dim=48,
    pool_heads=2,
)


def test_qwen_vl_weights_load_under_their_official_key_names(tmp_path):
    state = qwen_visual_state_dict(QWEN_LIKE)
    torch.save(state, tmp_path / "qwen_vit_G.pt")
    model = load_qwen_vit(tmp_path / "qwen_vit_G.pt", QWEN_LIKE)
    assert torch.equal(model.patch_embed.weight, state["conv1.weight"])
    assert torch.equal(model.positions, state["positional_embedding"])
    assert torch.equal(model.blocks[1].attn.in_proj.weight, state["transformer.resblocks.1.attn.in_proj.weight"])
    assert torch.equal(model.blocks[0].mlp.c_proj.bias, state["transformer.resblocks.0.mlp.c_proj.bias"])
    assert torch.equal(model.attn_pool.attn.in_proj_weight, state["attn_pool.attn.in_proj_weight"])
    assert torch.equal(model.attn_pool.pos_embed, state["attn_pool.pos_embed"])  # Qwen's own sin-cos table is kept
    assert torch.equal(model.proj, state["proj"]) and model.clip_normalize
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 16, 48)
    # the `transformer.visual.` prefix of a full Qwen-VL checkpoint is accepted too
    torch.save({f"transformer.visual.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pt")
    assert torch.equal(load_qwen_vit(tmp_path / "prefixed.pt", QWEN_LIKE).proj, state["proj"])


def test_qwen_vl_weights_with_wrong_keys_are_refused_with_a_list(tmp_path):
    state = qwen_visual_state_dict(QWEN_LIKE)
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    state["transformer.resblocks.1.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(LabError, match=r"missing \['blocks\.1\.mlp\.c_fc\.bias'\].*unexpected \['blocks\.1\.extra'\]"):
        load_qwen_vit(tmp_path / "bad.pt", QWEN_LIKE)


def test_missing_paper_weights_name_the_path(tmp_path, monkeypatch):
    with pytest.raises(LabError, match=re.escape(str(tmp_path / "nowhere" / "qwen_vit_G.pt"))):
        load_qwen_vit(tmp_path / "nowhere" / "qwen_vit_G.pt")
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(LabError, match=re.escape(str(tmp_path / "visual_tokenizer" / "qwen_vit_G.pt"))):
        stage0.load_stage0_tokenizer(get_preset("paper"))
    with pytest.raises(LabError, match="pretrained ViT-bigG"):
        stage0.train_stage0(StageRun(get_preset("paper")))


# ---- descriptions and the contrastive loss ------------------------------------------------------------------------


def test_descriptions_agree_with_the_ground_truth():
    names = {c.name for c in CHARACTERS}
    seen: dict[str, tuple] = {}
    for split in ("train", "val", "test"):
        data = open_split(SAMPLE, split)
        for annotation in data.annotations.values():
            for truth in annotation["frames"]:
                text = describe_frame(truth)
                words = set(re.findall(r"\w+", text))
                hero = next(c for c in CHARACTERS if c.name == truth["protagonist"])
                scene = next(s for s in SCENES if s.name == truth["scene"])
                assert text.startswith(f"{hero.name}, a {hero.look}")
                assert words & names == set(truth["characters"])  # every visible character, no one else
                assert f"{scene.at} the {scene.name}" in text and f"drawn in {truth['style']} style." in text
                assert {p.name for p in PROPS} & words == set(truth["props"])
                key = (
                    truth["protagonist"],
                    tuple(sorted(truth["characters"])),
                    truth["scene"],
                    tuple(truth["props"]),
                    truth["style"],
                )
                assert seen.setdefault(text, key) == key  # one text, one visible state
    assert describe_frame(
        {
            "protagonist": "Mira",
            "characters": ["Mira", "Bo"],
            "scene": "forest",
            "props": ["key", "map"],
            "style": "pixel",
        }
    ) == (
        "Mira, a red round creature with a yellow hat, with Bo, in the forest, "
        "holding a key and a map, drawn in pixel style."
    )
    with pytest.raises(LabError, match="protagonist"):
        describe_frame({"scene": "forest", "style": "flat"})


def test_clip_loss_is_symmetric_infonce_and_handles_repeated_texts():
    torch.manual_seed(0)
    logits = torch.randn(5, 5)
    expected = (
        nn.functional.cross_entropy(logits, torch.arange(5)) + nn.functional.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    torch.testing.assert_close(clip_loss(logits, torch.arange(5)), expected)
    # two images share text 0: the text's target is split evenly between them, never a false negative
    index = torch.tensor([0, 0, 1])
    shared = torch.tensor([[5.0, -5.0], [5.0, -5.0], [-5.0, 5.0]])
    # image -> text is ~0; text 0 -> its two images is log 2 (the best a split target allows), text 1 ~0
    assert clip_loss(shared, index).item() == pytest.approx(math.log(2) / 4, abs=1e-3)
    scores = retrieval(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 1]))
    assert scores["top1"] == pytest.approx(2 / 3) and scores["chance_top1"] == pytest.approx(1 / 3)


def test_probe_and_augmentation_are_deterministic():
    y = torch.arange(60) % 3
    x = nn.functional.one_hot(y, 3).float()[:, None, :] + 0.1 * torch.randn(60, 2, 3)  # [M, N, D]: separable
    assert stage0.probe_accuracy(x[:40], y[:40], x[40:], y[40:]) == 1.0
    images = torch.rand(4, 3, 16, 16)
    first = augment(images, 2, True, torch.Generator().manual_seed(5))
    assert (
        torch.equal(first, augment(images, 2, True, torch.Generator().manual_seed(5))) and first.shape == images.shape
    )


# ---- training runs on the committed sample ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 4-step stage-0 run on data_samples/ (a few seconds)."""
    out = tmp_path_factory.mktemp("stage0") / "visual_tokenizer"
    manifest = stage0.train_stage0(StageRun(TINY, data_root=SAMPLE, out=out, steps=4, progress=False))
    return out, manifest


@pytest.mark.slow
def test_short_stage0_run_writes_an_artifact_with_a_complete_manifest(short_run):
    out, manifest = short_run
    assert (out / WEIGHTS).is_file() and (out / "text_tokenizer" / "tokenizer.json").is_file()
    for key in (
        "stage",
        "preset",
        "config_hash",
        "seed",
        "git_commit",
        "packages",
        "wall_seconds",
        "command",
        "metrics",
        "schedule",
        "text_tower",
    ):
        assert key in manifest, key
    assert (
        manifest["stage"] == "visual_tokenizer"
        and manifest["preset"] == "tiny"
        and manifest["schedule_settings"]["steps"] == 4
    )
    assert (
        manifest["packages"]["torch"]
        and manifest["wall_seconds"] > 0
        and manifest["command"] == "labkit train stage0 --preset tiny --steps 4"
    )
    for key in ("val_top1", "val_top5", "test_top1", "test_top5", "val_chance_top1", "val_probe_protagonist"):
        assert 0 <= manifest["metrics"][key] <= 1, key
    pair, text_tokenizer, _ = stage0.load_stage0(out, TINY)
    assert (
        pair.image_encoder.num_features == 16 and text_tokenizer.vocab_size == pair.text.token_embedding.num_embeddings
    )


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(short_run, tmp_path):
    out, _ = short_run
    resumed = tmp_path / "visual_tokenizer"
    partial = stage0.train_stage0(StageRun(TINY, data_root=SAMPLE, out=resumed, steps=4, progress=False, stop_after=2))
    assert partial["interrupted_at"] == 2 and not resumed.exists()
    manifest = stage0.train_stage0(StageRun(TINY, data_root=SAMPLE, out=resumed, steps=4, progress=False))
    assert manifest["resumed_from_step"] == 2 and [h["step"] for h in manifest["history"]] == [1, 2, 3, 4]
    a = VisualTokenizer.from_pretrained(out, TINY).state_dict()
    b = VisualTokenizer.from_pretrained(resumed, TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_features_for_a_split_are_extracted_and_cached(short_run, monkeypatch):
    out, _ = short_run
    monkeypatch.setattr(stage0, "require", lambda name, preset: out)
    features = stage0.features_for_split(TINY, "val", data_root=SAMPLE, progress=False)
    assert features.shape == (2, 30, 16, 64) and features.dtype == torch.float32
    assert len(list((out / "features").glob("val-*.pt"))) == 1
    assert torch.equal(stage0.features_for_split(TINY, "val", data_root=SAMPLE, progress=False), features)
    tokenizer = VisualTokenizer.from_pretrained(out, TINY)
    frames = open_split(SAMPLE, "val")
    image = torch.from_numpy(np.array(frames.image(1, 7))).permute(2, 0, 1)[None]
    torch.testing.assert_close(stage0.extract_features(tokenizer, image)[0], features[1, 7])


def test_locate_artifact_prefers_the_reference_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("labkit.core.paths.project_root", lambda: tmp_path)
    monkeypatch.delenv("LABKIT_CHECKPOINTS", raising=False)
    assert locate_artifact("visual_tokenizer", "tiny") is None
    quick = tmp_path / "artifacts" / "tiny" / "quick" / "visual_tokenizer"
    quick.mkdir(parents=True)
    (quick / MANIFEST).write_text("{}")
    assert locate_artifact("visual_tokenizer", "tiny") == quick
    reference = tmp_path / "checkpoints" / "tiny" / "visual_tokenizer"
    reference.mkdir(parents=True)
    (reference / MANIFEST).write_text("{}")
    assert locate_artifact("visual_tokenizer", "tiny") == reference


@pytest.mark.slow
def test_a_short_judges_run_reports_held_out_accuracy(tmp_path):
    manifest = stage0.train_judges(StageRun(TINY, data_root=SAMPLE, out=tmp_path / "judges", steps=3, progress=False))
    for key in (
        "val_character_accuracy",
        "val_style_accuracy",
        "test_character_accuracy",
        "test_style_accuracy",
        "test_clip_top1",
    ):
        assert 0 <= manifest["metrics"][key] <= 1, key
    assert manifest["seed"] != stage0.SEED  # judges are not the tokenizer's twins
    judges, _ = load_judges_artifact(tmp_path / "judges", TINY, stage0.judge_config(TINY))
    images = open_split(SAMPLE, "test")
    frames = torch.stack([torch.from_numpy(np.array(images.image(0, f))).permute(2, 0, 1) for f in range(3)])
    assert judges.predict_character(frames).shape == (3,) and judges.fid_features(frames).shape == (3, 128)
    score = judges.clip_score(frames, list(images.records[0].captions[:3]))
    assert score.shape == (3,) and bool((score.abs() <= 1 + 1e-5).all())


def test_bad_schedule_and_steps_are_parameter_errors():
    with pytest.raises(ParameterError, match="schedule"):
        stage0.train_stage0(StageRun(TINY, "forever", data_root=SAMPLE))
    with pytest.raises(ParameterError, match="steps"):
        stage0.train_judges(StageRun(TINY, data_root=SAMPLE, steps=0))


def test_frechet_distance_in_the_judge_space():
    from labkit.metrics.scores import frechet_distance

    a = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + torch.tensor([3.0, 0, 0, 0])) == pytest.approx(9, rel=1e-6)
