"""The de-tokenizer (SDXL architecture): sizes, conditioning, what trains in each mode, save/load, sampling,
stage 1 / stage 3 runs that write artifacts and resume exactly, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.cli.main import main
from labkit.core.errors import LabError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.models.detokenizer import Detokenizer, unet_config
from labkit.models.official_checkpoint import load_official_detokenizer
from labkit.models.resampler_xl import ResamplerXL
from labkit.training import stage1, stage3
from labkit.training.common import StageRun

SAMPLE = project_root() / "data_samples" / "storystream-mini"
TINY = get_preset("tiny")


def tiny_detokenizer(seed: int = 0) -> Detokenizer:
    torch.manual_seed(seed)
    return Detokenizer(TINY.detokenizer, 16, 64, preset="tiny").eval()


def test_paper_unet_is_sdxl_base_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(get_preset("paper").detokenizer))
    count = sum(p.numel() for p in unet.parameters())
    assert abs(count - 2.57e9) / 2.57e9 < 0.005  # SDXL base 1.0: 2,567,463,684
    assert unet.config.cross_attention_dim == 2048 and unet.config.addition_embed_type == "text_time"
    assert unet.config.projection_class_embeddings_input_dim == 2816  # 6 x 256 time ids + 1280 pooled


@pytest.mark.slow
def test_info_json_lists_the_de_tokenizer(capsys):
    assert main(["info", "--preset", "paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["parameters"]["detokenizer.unet"]["total"] - 2.57e9) / 2.57e9 < 0.005
    assert info["detokenizer"]["cross_attention_dim"] == 2048


def test_resampler_maps_features_to_sdxl_conditioning_and_normalises_over_tokens():
    resampler = ResamplerXL(64, 32, 2, 4, 8, 16, (24, 40)).eval()
    features = torch.randn(3, 16, 64)
    tokens, pooled = resampler(features)
    assert tokens.shape == (3, 16, 64) and pooled.shape == (3, 40)
    # the official quirk: F.normalize(x) over dim 1 (tokens) - scaling one channel across all tokens changes nothing
    scaled = features.clone()
    scaled[:, :, 5] *= 7.0
    assert torch.allclose(resampler(scaled)[0], tokens, atol=1e-5)
    assert {
        "layers.0.0.norm1.weight",
        "layers.0.0.to_kv.weight",
        "unet_proj_1.weight",
        "unet_attnpool.c_proj.weight",
    } <= set(resampler.state_dict())


def test_official_mode_trains_exactly_the_resampler_and_unet_to_k_to_v():
    model = tiny_detokenizer()
    official = set(model.set_trainable("official"))
    unet_part = {n for n in official if n.startswith("unet.")}
    assert unet_part and all(n.endswith(("to_k.weight", "to_v.weight")) for n in unet_part)
    expected = {f"unet.{name}.weight" for name, m in model.unet.named_modules() if name.endswith(("to_k", "to_v"))}
    assert unet_part == expected and any(".attn1." in n for n in unet_part) and any(".attn2." in n for n in unet_part)
    assert {n for n in official if n.startswith("resampler.")} == {
        f"resampler.{n}" for n, _ in model.resampler.named_parameters()
    }
    full = set(model.set_trainable("full"))
    assert full == {n for n, _ in model.named_parameters() if not n.startswith("vae.")}
    assert not any(n.startswith("vae.") for n in official | full)
    with pytest.raises(LabError, match="unknown de-tokenizer mode"):
        model.set_trainable("lora")


@pytest.mark.slow
def test_save_and_from_pretrained_round_trip_is_bit_identical(tmp_path):
    model = tiny_detokenizer()
    model.negative_features.normal_()
    model.save_pretrained(tmp_path / "d")
    assert {"unet", "vae", "scheduler", "resampler", "detokenizer.json"} <= {p.name for p in (tmp_path / "d").iterdir()}
    loaded = Detokenizer.from_pretrained(tmp_path / "d", "tiny")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    features = torch.randn(2, 16, 64)
    assert torch.equal(model.sample(features, steps=2), loaded.sample(features, steps=2))
    model.save_pretrained(tmp_path / "novae", include_vae=False)
    with pytest.raises(LabError, match="saved without its VAE"):
        Detokenizer.from_pretrained(tmp_path / "novae")
    assert torch.equal(
        Detokenizer.from_pretrained(tmp_path / "novae", vae=model.vae).unet.conv_in.weight, model.unet.conv_in.weight
    )


def test_a_de_tokenizer_of_another_preset_is_refused(tmp_path):
    model = tiny_detokenizer()
    model.save_pretrained(tmp_path / "d")
    with pytest.raises(LabError, match="preset 'tiny'.*not for 'small'.*labkit train stage1 --preset small"):
        Detokenizer.from_pretrained(tmp_path / "d", "small")


@pytest.mark.slow
def test_sampling_is_seeded_batching_invariant_and_checks_shapes():
    model = tiny_detokenizer()
    features = torch.randn(4, 16, 64)
    images = model.sample(features, steps=2, batch_size=4)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    rebatched = model.sample(features, steps=2, batch_size=3)  # same noise; float rounding may move a pixel by a level
    assert (images.int() - rebatched.int()).abs().max() <= 2
    assert (images.int() - model.sample(features, steps=2, seed=1).int()).abs().float().mean() > 5
    with pytest.raises(LabError, match=r"expected features of shape \[batch, 16, 64\].*got \[4, 16, 32\]"):
        model.sample(torch.randn(4, 16, 32))


@pytest.mark.slow
def test_training_loss_is_a_finite_scalar_that_reaches_the_resampler():
    model = tiny_detokenizer()
    model.set_trainable("full")
    latents = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, TINY.detokenizer.latent_channels, 16, 16)
    loss = model.loss(torch.randn(2, 16, 64), latents, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and model.resampler.latents.grad.abs().sum() > 0


def test_missing_sdxl_folder_lists_every_path(tmp_path, monkeypatch, capsys):
    with pytest.raises(LabError) as error:
        load_official_detokenizer(tmp_path)
    assert "stable-diffusion-xl-base-1.0/unet/config.json" in str(error.value)
    assert "detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin" in str(error.value)
    monkeypatch.setenv("LABKIT_WEIGHTS", str(tmp_path))
    features = tmp_path / "f.pt"
    torch.save(torch.randn(256, 4096), features)
    assert main(["detokenize", "--preset", "paper", "--features", str(features), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "stable-diffusion-xl-base-1.0/vae/config.json" in err and "Traceback" not in err


# ---- stage runs on data_samples/ (a few seconds each) ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    vae = stage1.train_vae(StageRun(TINY, data_root=SAMPLE, out=root / "vae", steps=2, progress=False))
    base = stage1.train_stage1(
        StageRun(TINY, data_root=SAMPLE, out=root / "detokenizer", steps=2, progress=False),
        vae_folder=root / "vae",
        sample_steps=2,
    )
    return root, vae, base


@pytest.mark.slow
def test_vae_and_stage1_write_artifacts_with_manifests(runs):
    root, vae, base = runs
    assert vae["stage"] == "vae" and vae["scaling_factor"] > 0 and "test_originals" in vae["metrics"]
    for key in ("character_accuracy", "style_accuracy", "fid_analogue", "lpips_to_original", "lpips_backbone"):
        assert key in base["metrics"]["test"], key
    assert base["vae"]["path"].endswith("vae") and base["stage"] == "stage1"
    model, manifest = stage1.load_detokenizer_artifact(root / "detokenizer", TINY)
    assert not (root / "detokenizer" / "vae").exists()  # the VAE is kept once, in its own artifact
    assert model.scaling_factor == pytest.approx(vae["scaling_factor"]) and manifest["seed"] == stage1.SEED


@pytest.mark.slow
def test_stage1_resumes_to_the_same_weights(runs, tmp_path):
    root, _, _ = runs
    kwargs = dict(data_root=SAMPLE, steps=3, progress=False)
    options = dict(vae_folder=root / "vae", sample_steps=1)
    straight = stage1.train_stage1(StageRun(TINY, out=tmp_path / "a", **kwargs), **options)
    assert stage1.train_stage1(StageRun(TINY, out=tmp_path / "b", stop_after=2, **kwargs), **options) == {
        "interrupted_at": 2
    }
    assert not (tmp_path / "b").exists()  # nothing half-written
    resumed = stage1.train_stage1(StageRun(TINY, out=tmp_path / "b", **kwargs), **options)
    assert resumed["resumed_from_step"] == 2 and straight["resumed_from_step"] == 0
    a = stage1.load_detokenizer_artifact(tmp_path / "a", TINY)[0].state_dict()
    b = stage1.load_detokenizer_artifact(tmp_path / "b", TINY)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", stage3.MODES)
def test_stage3_changes_only_what_its_mode_trains(runs, tmp_path, mode):
    root, _, _ = runs
    manifest = stage3.train_stage3(
        StageRun(TINY, data_root=SAMPLE, out=tmp_path / mode, steps=2, progress=False),
        mode,
        base=root / "detokenizer",
        sample_steps=1,
    )
    before = stage1.load_detokenizer_artifact(root / "detokenizer", TINY)[0].state_dict()
    after = stage1.load_detokenizer_artifact(tmp_path / mode, TINY, stage="stage3")[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("resampler.", "unet.")) for k in changed)
    if mode == "official":
        assert all(k.endswith(("to_k.weight", "to_v.weight")) for k in changed if k.startswith("unet."))
    else:
        assert any("conv" in k for k in changed)
    assert manifest["mode"] == mode and {"test", "stage1_on_regressed"} <= set(manifest["metrics"])


@pytest.mark.slow
def test_regressed_features_follow_the_random_length_layout():
    from labkit.core.artifacts import locate_artifact
    from labkit.training.stage2 import load_mllm

    model, tokenizer, _ = load_mllm(locate_artifact("mllm", "tiny"), TINY)
    captions = [[f"Mira walks {i}." for i in range(4)]]
    features = torch.randn(1, 4, 16, 64)
    pairs = stage3.compute_regressed(model, tokenizer, captions, features, chunk_length=4)
    assert pairs.features.shape == (3, 16, 64) and pairs.frame.tolist() == [1, 2, 3]
    # the target's own features never reach the MLLM: changing frame 3 leaves its regression unchanged
    other = features.clone()
    other[0, 3] = torch.randn(16, 64)
    assert torch.allclose(stage3.compute_regressed(model, tokenizer, captions, other, 4).features, pairs.features)


@pytest.mark.parametrize(
    "args, parameter",
    [
        (["train", "stage1", "--schedule", "forever"], "--schedule"),
        (["train", "stage1", "--steps", "0"], "--steps"),
        (["train", "stage3", "--steps", "0"], "--steps"),
    ],
)
def test_bad_stage_parameters_exit_2(capsys, args, parameter):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert parameter in err and "Traceback" not in err


@pytest.mark.slow
def test_detokenize_cli_refuses_wrong_shapes_and_writes_a_png(runs, tmp_path, capsys):
    root, _, _ = runs
    bad = tmp_path / "bad.pt"
    torch.save(torch.randn(16, 32), bad)
    out = tmp_path / "x.png"
    assert (
        main(["detokenize", "--detokenizer", str(root / "detokenizer"), "--features", str(bad), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "bad.pt" in err and "[batch, 16, 64]" in err and not out.exists()
    good = tmp_path / "good.pt"
    torch.save(torch.randn(2, 16, 64), good)
    assert (
        main(
            [
                "detokenize",
                "--detokenizer",
                str(root / "detokenizer"),
                "--features",
                str(good),
                "--out",
                str(out),
                "--steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(out).size == (128, 64)
