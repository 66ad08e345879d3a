"""Stage 1: de-tokenizer pre-training (paper §3.1) - and, at `tiny`, the VAE it needs first.

The paper starts from SDXL (whose VAE is pretrained) and trains the resampler + UNet to rebuild images from the
frozen ViT's features. Its code was never released (SEED-X issues #7, #11), so this is our own, following the
released stage-3 script where the two must agree: ε-prediction MSE, timesteps uniform over SDXL's 1000, the
target being the VAE latent of the very frame whose features condition it. One addition: 10% of rows see the
blank frame's features instead (conditioning dropout), so that guidance against that negative means something.

Steps at `tiny` (docs/paper_to_code.md): a small `AutoencoderKL` (4x down to 16 x 16 x 4) trained on the frames first
("stage 1a"), then the de-tokenizer on the frozen visual tokenizer's features of every training frame.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from labkit.core.artifacts import (
    MANIFEST,
    StaleArtifact,
    build_command,
    checked_manifest,
    config_hash,
    read_manifest,
    rebuild_command,
    require,
)
from labkit.core.atomic import build_directory, write_text
from labkit.core.devices import to_module_device
from labkit.core.errors import LabError
from labkit.core.paths import portable_path, project_root
from labkit.core.presets import Preset
from labkit.data.frames import load_frames, to_float
from labkit.metrics.lpips_metric import get_metric
from labkit.models.detokenizer import Detokenizer, vae_config
from labkit.training.common import StageRun, base_manifest, prepare_workdir, run_manifest, step_generator, thin
from labkit.training.detokenizer_eval import EvalFrames, image_metrics
from labkit.training.loop import Schedule
from labkit.training.stage0 import extract_features, features_for_split, load_judges, load_stage0_tokenizer

VAE, NAME = "vae", "detokenizer"
SEED = 3
DROPOUT = 0.1  # share of rows conditioned on the blank frame (the guidance negative)
VAE_SCHEDULES = {  # measured: MSE alone, 400 steps x 32 -> 44% identity on reconstructions; L1 + LPIPS, 300 x 16 -> 60%
    "quick": Schedule(
        steps=100, batch_size=16, lr=2e-3, warmup=10, weight_decay=0.0, checkpoint_every=50, eval_every=100
    ),
    "reference": Schedule(
        steps=900, batch_size=16, lr=2e-3, warmup=20, weight_decay=0.0, checkpoint_every=100, eval_every=300
    ),
}
SCHEDULES = {
    "quick": Schedule(
        steps=200, batch_size=32, lr=1e-3, warmup=20, weight_decay=0.01, checkpoint_every=50, eval_every=200
    ),
    "reference": Schedule(
        steps=6000, batch_size=32, lr=1e-3, warmup=100, weight_decay=0.01, checkpoint_every=250, eval_every=500
    ),
}
KL_WEIGHT = 1e-6  # Stable Diffusion's VAE: a whisper of KL keeps the latent space smooth without blurring
PERCEPTUAL_WEIGHT = 1.0  # SD's VAE loss: L1 + LPIPS (+ KL, + a GAN term we leave out); LPIPS keeps shapes sharp


def _require_trainable(preset: Preset) -> None:
    if preset.pretrained_weights:
        raise LabError(
            f"the {preset.name} preset does not train its de-tokenizer here: it reads SDXL base and the released "
            "SEED-Story de-tokenizer from a local folder (labkit.training.stage1.load_paper_detokenizer)"
        )


# ---- stage 1a: the VAE ------------------------------------------------------------------------------------


def vae_hash(preset: Preset) -> str:
    return config_hash(vae_config(preset.detokenizer))


def load_vae(folder: Path | str, preset: Preset) -> AutoencoderKL:
    folder = Path(folder)
    manifest = checked_manifest(folder, VAE, preset.name)
    if manifest.get("config_hash") != vae_hash(preset):
        raise StaleArtifact(
            f"{folder}: a VAE with other sizes than the current {preset.name!r} preset's; "
            f"rebuild it: {rebuild_command(folder, VAE, preset.name)}"
        )
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)


def train_vae(run: StageRun, steps: int | None = None) -> dict:
    """Train the tiny `AutoencoderKL` on training frames (MSE + KL); set its latent scaling factor; save it.

    `steps` overrides the VAE schedule's steps (`run.steps` is the de-tokenizer's, when both train in a row)."""
    preset, schedule, resume, stop_after = run.preset, run.schedule, run.resume, run.stop_after
    _require_trainable(preset)
    plan = run.plan(VAE_SCHEDULES, steps)
    data_root = run.data()
    out, workdir = run.folders(VAE)
    prepare_workdir(
        workdir, {"stage": VAE, "preset": preset.name, "plan": asdict(plan), "data": str(data_root)}, resume
    )
    start = time.perf_counter()
    frames = load_frames(data_root, "train").images.flatten(0, 1)
    judges, evaluation = load_judges(preset), EvalFrames.from_split(data_root, "val")
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**vae_config(preset.detokenizer))

    def make_batch(step: int, rows: range) -> torch.Tensor:
        index = torch.randint(len(frames), (plan.batch_size,), generator=step_generator(SEED, step))
        return to_float(frames[index[list(rows)]])

    lpips = get_metric()  # frozen; gradients flow through it to the reconstruction

    def loss_fn(model: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        posterior = model.encode(images).latent_dist
        reconstruction = model.decode(posterior.sample()).sample
        l1, kl = (reconstruction - images).abs().mean(), posterior.kl().mean()
        perceptual = lpips.model.to(images.device)(reconstruction, images, normalize=False).mean()  # no-op on CPU
        return l1 + PERCEPTUAL_WEIGHT * perceptual + KL_WEIGHT * kl, {
            "l1": l1.detach(),
            "lpips": perceptual.detach(),
            "kl": kl.detach(),
        }

    def evaluate(model: AutoencoderKL) -> dict:
        return image_metrics(reconstruct(model, evaluation.images), evaluation, judges, lpips=False)

    result = run.fit(
        vae,
        make_batch,
        loss_fn,
        plan,
        workdir,
        evaluate=evaluate,
        desc=f"stage 1a VAE ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after}
    vae.eval()
    with torch.no_grad():  # SD's recipe: scale latents to unit variance (SDXL's VAE: 0.13025)
        latents = torch.cat(
            [
                vae.encode(to_float(to_module_device(vae, c))).latent_dist.mean.cpu()
                for c in frames[:: max(1, len(frames) // 1024)].split(128)
            ]
        )
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    test = EvalFrames.from_split(data_root, "test")
    metrics = {
        "val": evaluate(vae),
        "test": image_metrics(reconstruct(vae, test.images), test, judges),
        "test_originals": image_metrics(test.images, test, judges, lpips=False),
    }
    manifest = {
        "stage": VAE,
        "name": VAE,
        "config_hash": vae_hash(preset),
        "config": vae_config(preset.detokenizer),
        **base_manifest(run, VAE, plan, SEED, data_root),
        "loss": f"L1 + {PERCEPTUAL_WEIGHT} LPIPS ({lpips.backbone}) + {KL_WEIGHT} KL",
        "scaling_factor": vae.config.scaling_factor,
        **run_manifest(start, result, metrics),
    }
    if result.is_main_process:
        with build_directory(out, overwrite=True) as tmp:
            (vae.half() if schedule == "reference" else vae).save_pretrained(tmp)
            write_text(tmp / MANIFEST, _json(manifest))
    return manifest


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """uint8 frames -> their VAE reconstructions (posterior mean), uint8."""
    chunks = (to_float(to_module_device(vae, c)) for c in images.split(batch))
    out = [vae.decode(vae.encode(c).latent_dist.mean).sample.cpu() for c in chunks]
    return torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def vae_folder_for(preset: Preset) -> Path:
    """The VAE artifact later steps use: the reference one, else a quick one (`labkit train stage1` makes both)."""
    return require(VAE, preset.name)


# ---- stage 1b: the de-tokenizer on true features ----------------------------------------------------------


def new_detokenizer(preset: Preset, vae: AutoencoderKL, seed: int = SEED) -> Detokenizer:
    """A fresh de-tokenizer around a trained VAE, with the blank frame's features as its guidance negative."""
    config = preset
    torch.manual_seed(seed)
    model = Detokenizer(
        config.detokenizer,
        config.visual_tokenizer.num_features,
        config.visual_tokenizer.feature_dim,
        preset=preset.name,
        vae=vae,
    )
    blank = torch.zeros(1, 3, config.data.image_size, config.data.image_size)  # ViT(zeros), as the official pipeline
    model.negative_features.copy_(extract_features(load_stage0_tokenizer(preset), blank)[0])
    return model


class LatentBank:
    """Every training frame's VAE posterior (mean, std), encoded once; a step draws latents from it."""

    def __init__(self, model: Detokenizer, images: torch.Tensor, batch: int = 128):
        means, stds = [], []
        with torch.no_grad():
            for chunk in images.split(batch):
                posterior = model.vae.encode(to_float(chunk)).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        self.mean, self.std, self.scale = torch.cat(means), torch.cat(stds), model.scaling_factor

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[index].shape, generator=generator)
        return (self.mean[index] + self.std[index] * noise) * self.scale


def with_dropout(
    features: torch.Tensor, negative: torch.Tensor, generator: torch.Generator, rate: float = DROPOUT
) -> torch.Tensor:
    drop = torch.rand(len(features), generator=generator) < rate
    return torch.where(drop.view(-1, 1, 1), negative.expand_as(features), features)


def train_stage1(
    run: StageRun,
    seed: int = SEED,
    sample_steps: int = 10,
    guidance_scale: float = 3.0,
    vae_folder: Path | str | None = None,
) -> dict:
    """Train resampler + UNet to rebuild frames from their true features; write the de-tokenizer artifact.

    `vae_folder`: the VAE artifact to build on (default: `vae_folder_for(preset)`)."""
    preset, schedule, resume, progress, stop_after = run.preset, run.schedule, run.resume, run.progress, run.stop_after
    _require_trainable(preset)
    plan = run.plan(SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(NAME)
    start = time.perf_counter()
    vae_folder = Path(vae_folder) if vae_folder else vae_folder_for(preset)
    vae = load_vae(vae_folder, preset)
    prepare_workdir(
        workdir,
        {
            "stage": NAME,
            "preset": preset.name,
            "plan": asdict(plan),
            "seed": seed,
            "data": str(data_root),
            "vae": str(vae_folder.resolve()),
        },
        resume,
    )
    model = new_detokenizer(preset, vae, seed)
    model.set_trainable("stage1")
    frames = load_frames(data_root, "train").images.flatten(0, 1)
    features = features_for_split(preset, "train", data_root, progress).flatten(0, 1)
    bank = LatentBank(model, frames)
    judges = load_judges(preset)
    val = EvalFrames.from_split(data_root, "val", features_for_split(preset, "val", data_root, progress))

    def make_batch(step: int, rows: range) -> dict:
        generator = step_generator(seed, step)
        index = torch.randint(len(frames), (plan.batch_size,), generator=generator)[list(rows)]
        return {
            "features": with_dropout(features[index], model.negative_features, generator),
            "latents": bank.draw(index, generator),
            "generator": generator,
        }

    def evaluate(detokenizer: Detokenizer) -> dict:
        images = detokenizer.sample(val.features, steps=sample_steps, guidance_scale=guidance_scale)
        return image_metrics(images, val, judges, lpips=False)

    result = run.fit(
        model,
        make_batch,
        lambda m, b: (m(b["features"], b["latents"], b["generator"]), {}),
        plan,
        workdir,
        evaluate=evaluate,
        desc=f"stage 1 de-tokenizer ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after}
    test = EvalFrames.from_split(data_root, "test", features_for_split(preset, "test", data_root, progress))
    images = model.sample(test.features, steps=sample_steps, guidance_scale=guidance_scale, progress=progress)
    manifest = {
        "stage": "stage1",
        "name": NAME,
        "config_hash": detokenizer_hash(preset),
        **base_manifest(run, NAME, plan, seed, data_root),
        "vae": vae_reference(vae_folder, preset),
        "sampling": {
            "scheduler": "EulerDiscreteScheduler",
            "steps": sample_steps,
            "guidance_scale": guidance_scale,
            "seed": 42,
        },
        "conditioning_dropout": DROPOUT,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "metrics": {"test": image_metrics(images, test, judges)},
        "history": thin(result.history),
    }
    if result.is_main_process:
        save_detokenizer(model, out, manifest, half=schedule == "reference")
    return manifest


# ---- de-tokenizer artifacts (shared with stage 3) ---------------------------------------------------------


def detokenizer_hash(preset: Preset) -> str:
    config = preset
    return config_hash(
        {
            "detokenizer": asdict(config.detokenizer),
            "features": [config.visual_tokenizer.num_features, config.visual_tokenizer.feature_dim],
        }
    )


def vae_reference(folder: Path, preset: Preset) -> dict:
    """Which VAE a de-tokenizer artifact was trained with (artifacts do not repeat its weights, they name them)."""
    return {
        "path": portable_path(folder),
        "schedule": read_manifest(folder).get("schedule"),
        "config_hash": vae_hash(preset),
    }


def _vae_of(folder: Path, manifest: dict, preset: Preset) -> AutoencoderKL:
    path = Path(manifest.get("vae", {}).get("path", ""))
    path = path if path.is_absolute() else project_root() / path
    if not (path / MANIFEST).is_file():
        raise LabError(
            f"{folder}: needs the VAE it was trained with, {path}, which is missing; "
            f"rebuild it: {build_command(VAE, preset.name)}"
        )
    return load_vae(path, preset)


def save_detokenizer(model: Detokenizer, out: Path, manifest: dict, half: bool) -> None:
    """`save_pretrained` without the VAE (kept once, in the vae artifact) + manifest, written atomically."""
    with build_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, half=half, include_vae=False)
        write_text(tmp / MANIFEST, _json(manifest))


def load_detokenizer_artifact(folder: Path | str, preset: Preset, stage: str = "stage1") -> tuple[Detokenizer, dict]:
    """A de-tokenizer artifact joined with the preset's VAE artifact; refused if made for another preset or sizes."""
    folder = Path(folder)
    name = NAME if stage == "stage1" else read_manifest(folder).get("name", "detokenizer_official")
    manifest = checked_manifest(folder, name, preset.name)
    if manifest.get("config_hash") != detokenizer_hash(preset):
        raise StaleArtifact(
            f"{folder}: a de-tokenizer with other sizes than the current {preset.name!r} preset's; "
            f"rebuild it: {rebuild_command(folder, name, preset.name)}"
        )
    return Detokenizer.from_pretrained(folder, preset.name, vae=_vae_of(folder, manifest, preset)), manifest


def load_stage1_detokenizer(preset: Preset) -> Detokenizer:
    """The stage-1 de-tokenizer: the reference checkpoint, else a quick one. Never trains."""
    return load_detokenizer_artifact(require(NAME, preset.name), preset)[0]


def _json(payload: dict) -> str:
    import json

    return json.dumps(payload, indent=2, default=str) + "\n"
