"""Stage 3 at the paper preset: adapt SDXL base + the released stage-1 de-tokenizer to the MLLM's regressed
features (paper §3.3).

What the official run does (`scripts/adapt_storystream.sh`, `src/train/train_sdxl_img2img_llm.py`,
`configs/detokenizer/detokenizer_sdxl_qwen_vit_pretrained.yaml`, `configs/data/george_sdxl.yaml`): SDXL base's UNet
and VAE (`--diffusion_model_path pretrained/stable-diffusion-xl-base-1.0`) under the released *pretrained*
de-tokenizer (`SDXLAdapter.from_pretrained(.., detokenizer_pretrained/checkpoint-55000)`); the frozen agent
(`agent_7b_sft.yaml`: Llama-2-7B + LoRA, the stage-2 `george_sft` checkpoint) regresses each target frame's
features (`return_recon_image_embeds=True`); ε-prediction MSE on the SDXL VAE latent of the frame at 1024 px
(`sd_transform_1024.yaml`), timesteps uniform over DDPM's 1000; `SDXLAdapter.set_trainable_v2` with `full_ft`
False: the resampler and every UNet `to_k` / `to_v` train; UNet gradient checkpointing on; AdamW lr 1e-4, weight
decay 0.03 (betas and eps torch's defaults), cosine with 500 warm-up steps to 1% of the peak, gradient norm 1.0,
1600 steps of 4 samples per GPU x 8 GPUs x 4 accumulation steps = 128, bf16, DeepSpeed ZeRO-2.

Here: the same start (`load_official_detokenizer(.., "pretrained")`, fp32, its guidance negative the ViT's
features of a blank frame as at inference), the lab's stage-2 artifact at this preset as the MLLM (a LoRA
adapter on the frozen Llama of the weights folder: `labkit.training.stage2.load_mllm`), the same loss through
the one training loop (`StageRun.fit`) in both modes (`official` as released, `full` as the paper says). The
target frame is resized to the de-tokenizer's size and encoded by the VAE at every step on the device, as the
official loop does: a bank of 128 x 128 x 4 posteriors for every training pair would take ~0.5 MiB each.
Deviations: no gradient accumulation (the 128 samples of a step are split over the processes; see
`labkit.training.memory_plan` for what that costs per GPU), and the evaluation during training is a denoising loss
on fixed validation pairs (sampling 1024 px images is the expensive part; the test images are sampled once at the
end, and once before training for the released de-tokenizer's baseline).

The artifact holds only what trained: `resampler.*` and the trained `unet.*` tensors under the released
`SDXLAdapter` key names (official mode: every to_k / to_v, ~0.1 of the UNet; full mode: the whole 2.6 B UNet,
5 GB in fp16), plus the guidance negative. SDXL base, the VAE and the untrained UNet weights are read from the
weights folder again on load (`load_paper_stage3`), as the released stage-2 agent leaves the Llama body there.

Without a judges artifact for the preset (stage 0 trains the lab's judges at `tiny`), the test metrics are the
judge-free ones and the manifest says so (`labkit.training.detokenizer_eval.NO_JUDGES`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from labkit.core.artifacts import (
    checked_manifest,
    config_hash,
    load_artifact,
    locate_artifact,
    read_manifest,
    require,
    save_artifact,
)
from labkit.core.atomic import save_torch
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import portable_path, weights_folder
from labkit.core.presets import Preset
from labkit.data.frames import load_frames, to_float
from labkit.models.detokenizer import NEGATIVE, Detokenizer
from labkit.models.official_checkpoint import PAPER_FILES, SDXL, load_official_detokenizer
from labkit.models.paper_weights import blank_features
from labkit.models.visual_tokenizer import load_qwen_vit
from labkit.training.common import StageRun, base_manifest, prepare_workdir, run_manifest, step_generator
from labkit.training.detokenizer_eval import image_metrics, paired_change
from labkit.training.loop import Schedule
from labkit.training.regressed import RegressedPairs, regressed_pairs
from labkit.training.sharding import refuse_unsupported_fsdp
from labkit.training.stage0 import JUDGES, load_judges
from labkit.training.stage2 import NAME as MLLM
from labkit.training.stage2_lora import ADDED_TOKENS

MODES = ("official", "full")
SEED = 4
# every file this stage reads from the weights folder: SDXL base, the released stage-1 de-tokenizer, the ViT
# (features and the guidance negative) and the Llama body under the stage-2 LoRA adapter
PARTS = ("sdxl", "detokenizer_pretrained", "visual_tokenizer", "llama")
_ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.03, min_lr_ratio=0.01)  # torch's AdamW defaults, as official
SCHEDULES = {
    # a smoke run on the real weights (minutes on 8 GPUs)
    "quick": Schedule(steps=100, batch_size=16, lr=1e-4, warmup=10, checkpoint_every=50, eval_every=50, **_ADAM),
    # scripts/adapt_storystream.sh: 1600 steps of 4 x 8 GPUs x 4 accumulation = 128 samples, 500 warm-up steps
    "reference": Schedule(
        steps=1600, batch_size=128, lr=1e-4, warmup=500, checkpoint_every=400, eval_every=400, **_ADAM
    ),
}
DROPOUT = 0.0  # the official stage 3 has no conditioning dropout (the lab's tiny stage 3 keeps stage 1's 10%)
VAL_PAIRS = 32  # validation pairs of the denoising loss evaluated during training
TEST_PAIRS = 64  # test pairs sampled at the end (1024 px images: the costly part), evenly spaced
BASELINE = "baseline_samples.pt"  # the released de-tokenizer's test images, sampled once per run (workdir)
HOLDS = "resampler.* and the trained unet.* tensors (SDXLAdapter key names), the guidance negative"


def artifact_name(mode: str) -> str:
    return f"detokenizer_{mode}"


def required_files(folder: Path) -> list[Path]:
    return [folder / relative for part in PARTS for relative in PAPER_FILES[part]] + [folder / ADDED_TOKENS]


def require_stage3_weights(folder: Path) -> None:
    """Every file stage 3 reads at the paper preset, checked before any work; one error lists all that are missing."""
    missing = [str(path) for path in required_files(folder) if not path.is_file()]
    if missing:
        listing = "\n  ".join(missing)
        raise LabError(
            f"stage 3 at the paper preset needs local files that are missing under {folder}:\n"
            f"  {listing}\n(SDXL base 1.0 and the released detokenizer_pretrained as the official README lays them "
            "out, the extracted Qwen-VL ViT, Llama-2-7b-hf and cvlm_llama2_tokenizer/added_tokens.json; nothing is "
            "downloaded)"
        )


def load_base(preset: Preset, folder: Path, negative: bool = True) -> tuple[Detokenizer, dict]:
    """SDXL base + the released stage-1 de-tokenizer in fp32, sizes from the files, checked against the preset's
    features; with `negative`, its guidance negative set from the ViT (`paper_weights.blank_features`)."""
    num_features, feature_dim = preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim
    model, report = load_official_detokenizer(folder, "pretrained", dtype=torch.float32, num_features=num_features)
    path = folder / PAPER_FILES["detokenizer_pretrained"][0]
    misplaced = [key for key in report["unexpected"] if key.startswith(("resampler.", "unet."))]
    if report["missing_resampler"] or misplaced:
        raise LabError(
            f"{path}: does not fit SDXL base's UNet and the resampler its shapes describe: missing "
            f"{report['missing_resampler'][:6]}, not placed {misplaced[:6]}"
        )
    if model.feature_shape != (num_features, feature_dim):
        raise LabError(
            f"{path}: reads {model.feature_shape[1]}-wide features; the {preset.name} preset's visual tokenizer "
            f"makes {num_features} x {feature_dim}"
        )
    if negative:
        vit = load_qwen_vit(folder / PAPER_FILES["visual_tokenizer"][0], preset.visual_tokenizer)
        with torch.no_grad():
            model.negative_features.copy_(blank_features(vit)[0].float())
    return model, {"file": portable_path(path), "unet_keys_loaded": report["unet_keys_loaded"]}


def stage3_hash(model: Detokenizer, mode: str) -> str:
    """What the artifact's tensors depend on: the de-tokenizer's sizes (read from the files), its features, the mode."""
    return config_hash(
        {"detokenizer": asdict(model.config), "features": list(model.feature_shape), "mode": mode, "base": "pretrained"}
    )


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (or [-1, 1]) frames -> [-1, 1] floats at `size` px (the official `sd_transform_1024`; antialiased)."""
    pixels = to_float(images) if images.dtype == torch.uint8 else images.float()
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def encode_targets(model: Detokenizer, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents of the target frames: a draw from the posterior with the batch's own noise (the official
    `latent_dist.sample()`, reproducible here because the noise comes with the step's batch)."""
    weight = next(model.vae.parameters())
    posterior = model.vae.encode(resized(images, model.config.image_size).to(weight)).latent_dist
    return (posterior.mean + posterior.std * noise.to(posterior.mean)).float() * model.scaling_factor


def latent_shape(model: Detokenizer) -> tuple[int, int, int]:
    size = model.config.image_size // 2 ** (len(model.config.vae_channels) - 1)
    return (model.config.latent_channels, size, size)


@torch.no_grad()
def denoising_loss(model: Detokenizer, pairs: RegressedPairs, images: torch.Tensor, seed: int = 0) -> dict:
    """The stage-3 loss on fixed validation pairs with fixed noise and timesteps: comparable across steps and runs."""
    weight, generator = next(model.unet.parameters()), torch.Generator().manual_seed(seed)
    total = 0.0
    for features, frames in zip(pairs.features.split(8), images.split(8)):
        noise = torch.randn((len(frames), *latent_shape(model)), generator=generator)
        latents = encode_targets(model, frames.to(weight.device), noise).to(weight.dtype)  # bf16 under ZeRO-2
        total += float(model.loss(features.to(weight), latents, generator)) * len(frames)
    return {"val_denoising_loss": total / max(1, len(images))}


def evenly(pairs: RegressedPairs, count: int) -> RegressedPairs:
    return pairs.subset(torch.linspace(0, len(pairs.features) - 1, min(count, len(pairs.features))).round().long())


def sample_images(model: Detokenizer, pairs: RegressedPairs, size: int, steps: int, guidance: float) -> torch.Tensor:
    """Images from the regressed features, resized to the data's frame size so that they are scored as the frames."""
    images = model.sample(pairs.features, steps=steps, guidance_scale=guidance)
    if images.shape[-1] == size:
        return images
    return resized(images, size).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def optional_judges(preset: Preset):
    """The stage-0 judges when the preset has an artifact (errors in it are reported); None when it has none."""
    return load_judges(preset) if locate_artifact(JUDGES, preset.name) is not None else None


def load_paper_stage3(
    folder: Path | str, preset: Preset, weights: Path | str | None = None
) -> tuple[Detokenizer, dict]:
    """A stage-3 artifact of a pretrained-weights preset: the base from the weights folder, its tensors on top."""
    folder = Path(folder)
    weights = Path(weights) if weights is not None else weights_folder()
    name = read_manifest(folder).get("name", "")
    if name not in {artifact_name(mode) for mode in MODES}:
        raise LabError(f"{folder}: a {name!r} artifact, not a stage-3 de-tokenizer")
    mode = checked_manifest(folder, name, preset.name)["mode"]
    require_stage3_weights(weights)
    model, _ = load_base(preset, weights, negative=False)
    state, manifest = load_artifact(folder, name, preset.name, stage3_hash(model, mode))
    ours = model.state_dict()
    unknown = sorted(key for key in state if key not in ours or ours[key].shape != state[key].shape)
    if unknown:
        raise LabError(f"{folder / 'model.safetensors'}: tensors that fit no weight of the base: {unknown[:6]}")
    model.load_state_dict(state, strict=False)
    model.negative_features.copy_(load_file(str(folder / NEGATIVE))["negative_features"])
    return model.eval(), manifest


def train_paper_stage3(
    run: StageRun,
    mode: str = "official",
    seed: int = SEED,
    sample_steps: int = 10,
    guidance_scale: float = 3.0,
    mllm: Path | str | None = None,
) -> dict:
    """Stage 3 at a preset that reads pretrained weights (`paper`, or a paper-shaped one): see the module docstring."""
    preset, progress = run.preset, run.progress
    if mode not in MODES:
        raise ParameterError("--mode", f"unknown stage-3 mode {mode!r}; choose one of {', '.join(MODES)}")
    refuse_unsupported_fsdp("stage 3", supported=False)  # DDP or ZeRO-2 (the official setup)
    weights = weights_folder()
    require_stage3_weights(weights)  # before any work
    mllm_folder = Path(mllm) if mllm is not None else require(MLLM, preset.name)
    plan = run.plan(SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(artifact_name(mode))
    start = time.perf_counter()
    setting = {"stage": "stage3", "preset": preset.name, "mode": mode, "plan": asdict(plan), "seed": seed}
    prepare_workdir(workdir, {**setting, "data": str(data_root), "mllm": str(mllm_folder.resolve())}, run.resume)
    model, base_report = load_base(preset, weights)
    trainable = model.set_trainable(mode)
    model.unet.enable_gradient_checkpointing()  # as train_sdxl_img2img_llm.py (non-reentrant in diffusers)
    # the main process runs the ViT and the MLLM over the splits once; the others read its caches
    with PartialState(cpu=run.torch_device().type == "cpu").main_process_first():
        pairs, val_pairs, test_pairs = (
            regressed_pairs(preset, split, data_root, progress, mllm_folder) for split in ("train", "val", "test")
        )
    val_pairs, test_pairs = evenly(val_pairs, VAL_PAIRS), evenly(test_pairs, TEST_PAIRS)
    frames = load_frames(data_root, "train").images
    val_images = val_pairs.truth(data_root, "val").images
    truth = test_pairs.truth(data_root, "test")
    size = truth.images.shape[-1]
    model.to(PartialState(cpu=run.torch_device().type == "cpu").device)  # this process's device, as the loop's
    before = baseline_samples(model, test_pairs, workdir, size, sample_steps, guidance_scale)
    shape = latent_shape(model)

    def make_batch(step: int, rows: range) -> dict:
        generator = step_generator(seed, step)
        index = torch.randint(len(pairs.features), (plan.batch_size,), generator=generator)
        noise = torch.randn((plan.batch_size, *shape), generator=generator)[list(rows)]  # a row's, however split
        index = index[list(rows)]
        return {
            "features": pairs.features[index],  # no conditioning dropout (DROPOUT), as the official stage 3
            "images": frames[pairs.story[index], pairs.frame[index]],
            "latent_noise": noise,
            "generator": generator,
        }

    def loss_fn(wrapped, batch: dict) -> tuple[torch.Tensor, dict]:
        latents = encode_targets(model, batch["images"], batch["latent_noise"])  # the frozen VAE: no wrapper needed
        return wrapped(batch["features"], latents, batch["generator"]), {}  # forward: DDP / ZeRO sync gradients

    result = run.fit(
        model,
        make_batch,
        loss_fn,
        plan,
        workdir,
        evaluate=lambda m: denoising_loss(m, val_pairs, val_images),
        desc=f"stage 3 {mode} ({run.schedule}, {preset.name})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": run.stop_after}
    judges = optional_judges(preset)
    after = sample_images(model, test_pairs, size, sample_steps, guidance_scale)
    metrics = {
        "test": image_metrics(after, truth, judges),
        "stage1_on_regressed": image_metrics(before, truth, judges),  # the released pretrained de-tokenizer
        "paired": None if judges is None else paired_change(after, before, truth, judges),
        "final": result.final_metrics,
    }
    manifest = {
        "stage": "stage3",
        "name": artifact_name(mode),
        "mode": mode,
        "config_hash": stage3_hash(model, mode),
        **base_manifest(run, artifact_name(mode), plan, seed, data_root),
        "base": {"weights": portable_path(weights), "sdxl": SDXL, **base_report},
        "mllm": portable_path(mllm_folder),
        "holds": HOLDS,
        "detokenizer": {**asdict(model.config), "features": list(model.feature_shape)},
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "conditioning_dropout": DROPOUT,
        "sampling": {"steps": sample_steps, "guidance_scale": guidance_scale},
        "judges": "stage-0 judges" if judges is not None else metrics["test"]["judges"],
        "test_pairs": len(test_pairs.features),
        **run_manifest(start, result, metrics),
    }
    if result.is_main_process:
        save_stage3(model, trainable, out, manifest, half=run.schedule == "reference")
    return manifest


def baseline_samples(
    model: Detokenizer, pairs: RegressedPairs, workdir: Path, size: int, steps: int, guidance: float
) -> torch.Tensor:
    """The test images of the de-tokenizer before adaptation, sampled once per run (kept in the workdir for a
    resumed run, whose model has already moved)."""
    path = workdir / BASELINE
    if path.is_file():
        return torch.load(path, weights_only=True)
    images = sample_images(model, pairs, size, steps, guidance)
    if PartialState().is_main_process:
        save_torch(images, path)
    return images


def save_stage3(model: Detokenizer, trainable: list[str], out: Path, manifest: dict, half: bool) -> None:
    """Only what trained (see the module docstring), atomically; fp16 for a reference run."""
    names = set(trainable)
    state = {name: p.detach().cpu() for name, p in model.named_parameters() if name in names}
    negative = {"negative_features": model.negative_features.detach().cpu().contiguous()}
    save_artifact(out, state, manifest, half=half, extra=lambda folder: save_file(negative, str(folder / NEGATIVE)))
