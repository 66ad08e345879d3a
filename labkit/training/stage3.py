"""Stage 3: adapt the de-tokenizer to the MLLM's regressed features (paper §3.3; official
`src/train/train_sdxl_img2img_llm.py` via `scripts/adapt_storystream.sh`).

Stage 1 taught the de-tokenizer to draw from *true* ViT features; at generation time it receives the MLLM's
*regressed* ones, which are close (cosine error ~0.06 at tiny) but not equal. Stage 3 fine-tunes on exactly
those: the frozen MLLM reads a random-length story sample (as in stage 2), regresses the target frame's
features, and the de-tokenizer learns to turn them into that frame (ε-prediction MSE on its VAE latent).

Two modes, the ablation the paper invites:
- `official`: what the released code trains (`SDXLAdapter.set_trainable_v2`, `full_ft=False`): the resampler
  and every UNet `to_k` / `to_v` Linear (self- and cross-attention); the rest of the UNet stays frozen.
- `full`: what the paper says ("we fully finetune the SD-XL model"): the resampler and the whole UNet.

The MLLM is frozen, so its regressed features for every (story chunk, target frame) pair are computed once
and cached (`regressed_pairs`). Deviation: we keep stage 1's 10% conditioning dropout (the official stage 3
has none) so the blank-frame guidance negative keeps its meaning after adaptation.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from labkit.core.artifacts import require
from labkit.core.errors import ParameterError
from labkit.core.paths import portable_path
from labkit.data.frames import load_frames
from labkit.training import stage3_paper
from labkit.training.common import StageRun, base_manifest, prepare_workdir, run_manifest, step_generator
from labkit.training.detokenizer_eval import EvalFrames, image_metrics, paired_change
from labkit.training.loop import Schedule
from labkit.training.regressed import RegressedPairs, compute_regressed, regressed_pairs  # noqa: F401 (re-exported)
from labkit.training.stage0 import load_judges
from labkit.training.stage1 import NAME as STAGE1
from labkit.training.stage1 import (
    LatentBank,
    _require_trainable,
    load_detokenizer_artifact,
    save_detokenizer,
    with_dropout,
)

SEED = 4
MODES = stage3_paper.MODES  # ("official", "full")
SCHEDULES = {  # the official run: lr 1e-4, weight decay 0.03, cosine with warm-up; tiny trains from a smaller start
    "quick": Schedule(
        steps=150, batch_size=32, lr=3e-4, warmup=15, weight_decay=0.03, checkpoint_every=50, eval_every=150
    ),
    "reference": Schedule(
        steps=1200, batch_size=32, lr=3e-4, warmup=60, weight_decay=0.03, checkpoint_every=200, eval_every=400
    ),
}
EVAL_STRIDE = 3  # test pairs scored: every third (chunk, target) pair


def artifact_name(mode: str) -> str:
    return f"{STAGE1}_{mode}"


def score(
    detokenizer,
    pairs: RegressedPairs,
    truth: EvalFrames,
    judges,
    sample_steps: int,
    guidance_scale: float,
    progress: bool = False,
    lpips: bool = True,
) -> dict:
    images = detokenizer.sample(pairs.features, steps=sample_steps, guidance_scale=guidance_scale, progress=progress)
    return image_metrics(images, truth, judges, lpips=lpips)


def train_stage3(
    run: StageRun,
    mode: str = "official",
    seed: int = SEED,
    sample_steps: int = 10,
    guidance_scale: float = 3.0,
    base: Path | str | None = None,
    mllm: Path | str | None = None,
) -> dict:
    """Adapt the stage-1 de-tokenizer to the frozen MLLM's regressed features; write the artifact.

    `base`: the stage-1 de-tokenizer artifact to start from (default: the reference one, else quick); `mllm`: the
    stage-2 artifact that regresses the features (default: the reference one, else quick). A preset that reads
    pretrained weights (`paper`) starts from SDXL base + the released stage-1 de-tokenizer instead
    (`labkit.training.stage3_paper`)."""
    preset, schedule, resume, progress, stop_after = run.preset, run.schedule, run.resume, run.progress, run.stop_after
    if mode not in MODES:
        raise ParameterError("--mode", f"unknown stage-3 mode {mode!r}; choose one of {', '.join(MODES)}")
    if preset.pretrained_weights:
        if base is not None:
            raise ParameterError("base", f"the {preset.name} preset starts from the weights folder's de-tokenizer")
        return stage3_paper.train_paper_stage3(run, mode, seed, sample_steps, guidance_scale, mllm)
    _require_trainable(preset)
    plan = run.plan(SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(artifact_name(mode))
    start = time.perf_counter()
    base_folder = Path(base) if base else require(STAGE1, preset.name)
    prepare_workdir(
        workdir,
        {
            "stage": "stage3",
            "preset": preset.name,
            "mode": mode,
            "plan": asdict(plan),
            "seed": seed,
            "data": str(data_root),
            "base": str(base_folder.resolve()),
        },
        resume,
    )
    model, base_manifest_ = load_detokenizer_artifact(base_folder, preset)
    baseline, _ = load_detokenizer_artifact(base_folder, preset)
    trainable = model.set_trainable(mode)
    pairs = regressed_pairs(preset, "train", data_root, progress, mllm)
    frames = load_frames(data_root, "train")
    bank = LatentBank(model, frames.images[pairs.story, pairs.frame])  # one latent posterior per pair's target
    judges = load_judges(preset)
    val_pairs = regressed_pairs(preset, "val", data_root, progress, mllm).subset(slice(0, None, 4 * EVAL_STRIDE))
    val_truth = val_pairs.truth(data_root, "val")

    def make_batch(step: int, rows: range) -> dict:
        generator = step_generator(seed, step)
        index = torch.randint(len(pairs.features), (plan.batch_size,), generator=generator)[list(rows)]
        return {
            "features": with_dropout(pairs.features[index], model.negative_features, generator),
            "latents": bank.draw(index, generator),
            "generator": generator,
        }

    result = run.fit(
        model,
        make_batch,
        lambda m, b: (m(b["features"], b["latents"], b["generator"]), {}),
        plan,
        workdir,
        evaluate=lambda m: score(m, val_pairs, val_truth, judges, sample_steps, guidance_scale, lpips=False),
        desc=f"stage 3 {mode} ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after}
    test_pairs = regressed_pairs(preset, "test", data_root, progress, mllm).subset(slice(0, None, EVAL_STRIDE))
    truth = test_pairs.truth(data_root, "test")
    after, before = (
        m.sample(test_pairs.features, steps=sample_steps, guidance_scale=guidance_scale, progress=progress)
        for m in (model, baseline)
    )
    metrics = {
        "test": image_metrics(after, truth, judges),
        "stage1_on_regressed": image_metrics(before, truth, judges),
        "paired": paired_change(after, before, truth, judges),  # the same pairs before and after: Table 4, paired
    }
    manifest = {
        "stage": "stage3",
        "name": artifact_name(mode),
        "mode": mode,
        "config_hash": base_manifest_["config_hash"],
        **base_manifest(run, artifact_name(mode), plan, seed, data_root),
        "base": portable_path(base_folder),
        "vae": base_manifest_["vae"],
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in set(trainable)),
        "sampling": base_manifest_.get("sampling"),
        "conditioning_dropout": base_manifest_.get("conditioning_dropout"),
        "test_pairs": len(test_pairs.features),
        **run_manifest(start, result, metrics),
    }
    if result.is_main_process:
        save_detokenizer(model, out, manifest, half=schedule == "reference")
    return manifest
