"""Stage 0 (the lab's own): train the visual tokenizer and the judges on StoryStream-mini.

The paper starts from a *pretrained* Qwen-VL ViT-bigG, frozen in every stage: its 256 x 4096 features already say
who is in a picture and where. The tiny preset has no such network, so stage 0 trains one CLIP-style: frames
against their ground-truth descriptions (`data/descriptions.py`), with some story captions mixed in. Everything
downstream reads these features: the MLLM regresses them, the de-tokenizer draws from them (identity from features
needs informative features: docs/paper_to_code.md). The judges that score generated stories are trained here too, apart.

Entry points (later stages and notebooks call these):
    train_stage0(StageRun(preset, schedule)) -> manifest; writes the tokenizer artifact
    train_judges(StageRun(preset, schedule)) -> manifest; writes the judges artifact
    load_stage0_tokenizer(preset)            the reference checkpoint, else a quick one (never trains)
    load_judges(preset)                      likewise for the judges
    extract_features / features_for_split   frames -> [S, F, N, D] features (cached per split)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from labkit.core.artifacts import require, save_artifact, weights_hash
from labkit.core.atomic import save_torch
from labkit.core.devices import default_device, to_module_device
from labkit.core.errors import LabError
from labkit.core.paths import artifacts_folder, project_root, weights_folder
from labkit.core.presets import Preset, VisualTokenizerPreset
from labkit.data.frames import SplitFrames, load_frames, to_float
from labkit.data.storystream_mini import ensure_dataset, load_tokenizer
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.metrics.scores import accuracy
from labkit.models.contrastive import (
    ImageTextPair,
    PairData,
    TextTower,
    TextTowerConfig,
    embed_images,
    embed_texts,
    load_pairs,
    retrieval,
)
from labkit.models.judges import TEXT_TOKENIZER, JudgeConfig, Judges, augment, judge_hash, load_judges_artifact
from labkit.models.official_checkpoint import PAPER_FILES
from labkit.models.visual_tokenizer import VisualTokenizer, load_qwen_vit, load_visual_tokenizer
from labkit.training.common import StageRun, base_manifest, prepare_workdir, step_generator
from labkit.training.loop import Schedule

NAME, JUDGES = "visual_tokenizer", "judges"
SEED = 0  # the tokenizer's; the judges use JudgeConfig.seed (1)


@dataclass(frozen=True)
class Stage0Config:
    """What stage 0 trains besides the tokenizer itself: the text tower and the mix of texts."""

    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=64))
    caption_mix: float = 0.25  # share of rows contrasted with the frame's story caption instead of its description
    temperature: float = 0.07  # CLIP's initial temperature (learned)


SCHEDULES = {  # visual tokenizer; quick <= 90 s on a 2-core CPU, reference about 8 min
    "quick": Schedule(steps=160, batch_size=96, lr=2e-3, warmup=15, checkpoint_every=80, eval_every=160),
    "reference": Schedule(steps=1500, batch_size=128, lr=1.5e-3, warmup=60, checkpoint_every=100, eval_every=250),
}
JUDGE_SCHEDULES = {
    "quick": Schedule(steps=150, batch_size=64, lr=3e-3, warmup=15, checkpoint_every=75, eval_every=150),
    "reference": Schedule(steps=900, batch_size=64, lr=2e-3, warmup=40, checkpoint_every=100, eval_every=150),
}
# the paper preset's tokenizer, where the official config reads it: <weights folder>/visual_tokenizer/qwen_vit_G.pt
QWEN_WEIGHTS = PAPER_FILES["visual_tokenizer"][0]


# ---- shared plumbing ------------------------------------------------------------------------------------------


def build_pair(
    config: VisualTokenizerPreset, stage: Stage0Config, text_tokenizer: StoryTokenizer, seed: int
) -> ImageTextPair:
    """A fresh visual tokenizer + text tower, initialised from `seed` (the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = TextTower(
            text_tokenizer.vocab_size, replace(stage.text, embed_dim=config.feature_dim), text_tokenizer.pad_id
        )
        return ImageTextPair(VisualTokenizer(config), text, stage.temperature)


def retrieval_metrics(pair: ImageTextPair, data: PairData, prefix: str) -> dict[str, float]:
    """Held-out image -> description retrieval among the split's distinct descriptions."""
    ids, mask, index = data.description_set()
    scores = retrieval(embed_images(pair, data.images), embed_texts(pair, ids, mask), index)
    return {f"{prefix}_{k}": v for k, v in scores.items()}


def probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, ridge: float = 10.0
) -> float:
    """A linear probe (ridge regression onto one-hot labels, closed form) on flattened features: what they encode."""
    train_x, test_x = train_x.flatten(1).double(), test_x.flatten(1).double()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1, dtype=torch.float64)], 1)
    y = F.one_hot(train_y, int(max(train_y.max(), test_y.max())) + 1).double()
    weights = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)
    test = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1, dtype=torch.float64)], 1)
    return accuracy((test @ weights).argmax(1), test_y)


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """The first two principal components of flattened features [M, ...] -> [M, 2] (for plots)."""
    x = features.flatten(1).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).float()


def probe_metrics(
    tokenizer: VisualTokenizer, train_data: PairData, test_data: PairData, prefix: str = "val"
) -> dict[str, float]:
    train_x, test_x = extract_features(tokenizer, train_data.images), extract_features(tokenizer, test_data.images)
    return {
        f"{prefix}_probe_{name}": probe_accuracy(train_x, train_data.labels[name], test_x, test_data.labels[name])
        for name in ("protagonist", "style", "scene")
    }


def train_stage0(run: StageRun, seed: int = SEED) -> dict:
    """Train the visual tokenizer contrastively on (frame, description) pairs; write its artifact; return the
    manifest."""
    start = time.perf_counter()
    config, preset, schedule, stop_after = run.preset, run.preset.name, run.schedule, run.stop_after
    if config.pretrained_weights:
        raise LabError(
            f"the {preset} preset does not train its visual tokenizer: it loads Qwen-VL's pretrained ViT-bigG "
            f"(labkit.models.visual_tokenizer.load_qwen_vit('{weights_folder() / QWEN_WEIGHTS}'))"
        )
    plan, stage = run.plan(SCHEDULES), Stage0Config()
    data_root = run.data()
    out, workdir = run.folders(NAME)
    text_tokenizer = load_tokenizer(data_root)
    train_data = load_pairs(data_root, "train", text_tokenizer, stage.text.max_length)
    val_data = load_pairs(data_root, "val", text_tokenizer, stage.text.max_length)
    model = build_pair(config.visual_tokenizer, stage, text_tokenizer, seed)

    def make_batch(step: int, rows: range) -> dict:
        generator = step_generator(seed, step)
        index = torch.randint(len(train_data.images), (plan.batch_size,), generator=generator)
        use_caption = torch.rand(plan.batch_size, generator=generator) < stage.caption_mix
        batch = train_data.batch(index[list(rows)], use_caption[list(rows)])
        return {**batch, "images": to_float(batch["images"])}

    prepare_workdir(
        workdir,
        {
            "stage": NAME,
            "preset": preset,
            "plan": asdict(plan),
            "stage0": asdict(stage),
            "seed": seed,
            "data": str(data_root.resolve()),
        },
        run.resume,
    )
    result = run.fit(
        model,
        make_batch,
        lambda m, b: m(b["images"], b["ids"], b["mask"], b["text_index"]),
        plan,
        workdir,
        evaluate=lambda m: retrieval_metrics(m, val_data, "val"),
        desc=f"stage 0 tokenizer ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after, "workdir": str(workdir)}
    model.eval()
    test_data = load_pairs(data_root, "test", text_tokenizer, stage.text.max_length)
    metrics = {
        **retrieval_metrics(model, val_data, "val"),
        **retrieval_metrics(model, test_data, "test"),
        **probe_metrics(model.image_encoder, train_data, val_data),
    }
    manifest = {
        "name": NAME,
        **base_manifest(run, NAME, plan, seed, data_root),
        "stage0": asdict(stage),
        "text_tower": asdict(model.text.config),
        "text_tokenizer": TEXT_TOKENIZER,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "metrics": metrics,
        "history": result.history[:: max(1, len(result.history) // 100)],
    }
    extra = {f"text.{k}": v for k, v in model.text.state_dict().items()} | {"logit_scale": model.logit_scale.detach()}
    model.image_encoder.save_pretrained(out, manifest, extra=extra, half=schedule == "reference")
    text_tokenizer.save_pretrained(out / TEXT_TOKENIZER)
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def load_stage0(folder: Path | str, preset: Preset) -> tuple[ImageTextPair, StoryTokenizer, dict]:
    """The whole stage-0 model (tokenizer + text tower, for retrieval), its text tokenizer and its manifest."""
    folder = Path(folder)
    tokenizer, extra, manifest = load_visual_tokenizer(folder, preset)
    text_tokenizer = StoryTokenizer.from_pretrained(folder / TEXT_TOKENIZER)
    text = TextTower(text_tokenizer.vocab_size, TextTowerConfig(**manifest["text_tower"]), text_tokenizer.pad_id)
    text.load_state_dict({k[len("text.") :]: v for k, v in extra.items() if k.startswith("text.")})
    pair = ImageTextPair(tokenizer, text)
    pair.logit_scale.data.copy_(extra["logit_scale"])
    return pair.eval().requires_grad_(False), text_tokenizer, manifest


def load_stage0_tokenizer(preset: Preset) -> VisualTokenizer:
    """The visual tokenizer later stages use: the reference checkpoint, else a quick artifact. Never trains: a
    missing one is a `LabError` naming `labkit train stage0`."""
    if preset.pretrained_weights:
        return load_qwen_vit(weights_folder() / QWEN_WEIGHTS, preset.visual_tokenizer)
    return VisualTokenizer.from_pretrained(require(NAME, preset.name), preset)


@torch.no_grad()
def extract_features(tokenizer: VisualTokenizer, frames: torch.Tensor | SplitFrames, batch: int = 256) -> torch.Tensor:
    """Features of every frame, batched: uint8 (or [-1, 1] float) [..., 3, H, W] -> float32 [..., N, D]."""
    images = frames.images if isinstance(frames, SplitFrames) else frames
    flat = images.reshape(-1, *images.shape[-3:])
    tokenizer.eval()
    chunks = (to_module_device(tokenizer, c) for c in flat.split(batch))
    out = [tokenizer(to_float(c) if c.dtype == torch.uint8 else c).float().cpu() for c in chunks]
    features = torch.cat(out) if out else torch.empty(0, tokenizer.num_features, tokenizer.feature_dim)
    return features.reshape(*images.shape[:-3], tokenizer.num_features, tokenizer.feature_dim)


def features_for_split(
    preset: Preset, split: str, data_root: Path | str | None = None, progress: bool = True
) -> torch.Tensor:
    """Features [S, F, N, D] of every frame of a split, cached beside the tokenizer artifact that made them.

    A reference checkpoint's cache goes to artifacts/<preset>/features/ instead (checkpoints/ is committed).
    The cache key holds the weights' hash and the split file's size and time, so a retrained tokenizer or a
    remade data set is never served stale features.
    """
    data_root = Path(data_root) if data_root else ensure_dataset(preset, progress)
    source = data_root / f"{split}.jsonl"
    if not source.is_file():
        raise LabError(f"{source}: not found (split {split!r} of a labkit data set)")
    if preset.pretrained_weights:  # 7 GB of Qwen-VL weights: identify them by path, size and time instead of hashing
        weights_file = weights_folder() / QWEN_WEIGHTS
        weights = f"{weights_file.resolve()}|{weights_file.stat().st_size}|{weights_file.stat().st_mtime_ns}"
        cache_dir = artifacts_folder(preset.name) / "features" / "qwen_vit_G"
    else:
        folder = require(NAME, preset.name)
        weights = weights_hash(folder)
        inside_checkpoints = project_root() / "checkpoints" in folder.resolve().parents
        cache_dir = artifacts_folder(preset.name) / "features" / NAME if inside_checkpoints else folder / "features"
    stat = source.stat()
    key = hashlib.sha256(
        f"{weights}|{data_root.resolve()}|{split}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"{split}-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    tokenizer = load_stage0_tokenizer(preset).to(default_device())  # the Qwen ViT (paper): on the GPU if there is one
    features = extract_features(tokenizer, load_frames(data_root, split))
    save_torch(features, cache)
    return features


# ---- the judges ----------------------------------------------------------------------------------------------


def judge_config(preset: Preset) -> JudgeConfig:
    return JudgeConfig(image_size=preset.data.image_size)


def judge_metrics(judges: Judges, data: PairData, prefix: str) -> dict[str, float]:
    """Held-out accuracy of both classifiers and the image-text judge's description retrieval."""
    ids, mask, index = data.description_set()
    scores = retrieval(embed_images(judges.image_text, data.images), embed_texts(judges.image_text, ids, mask), index)
    return {
        f"{prefix}_character_accuracy": accuracy(judges.predict_character(data.images), data.labels["protagonist"]),
        f"{prefix}_style_accuracy": accuracy(judges.predict_style(data.images), data.labels["style"]),
        f"{prefix}_clip_top1": scores["top1"],
        f"{prefix}_clip_top5": scores["top5"],
        f"{prefix}_clip_chance_top1": scores["chance_top1"],
    }


def train_judges(run: StageRun) -> dict:
    """Train the character and style classifiers and the image-text judge; write their artifact; return the manifest."""
    start = time.perf_counter()
    preset, schedule, stop_after = run.preset.name, run.schedule, run.stop_after
    config, plan = judge_config(run.preset), run.plan(JUDGE_SCHEDULES)
    data_root = run.data()
    out, workdir = run.folders(JUDGES)
    text_tokenizer = load_tokenizer(data_root)
    train_data = load_pairs(data_root, "train", text_tokenizer, config.text.max_length)
    val_data = load_pairs(data_root, "val", text_tokenizer, config.text.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        judges = Judges(config, text_tokenizer.vocab_size, text_tokenizer.pad_id)

    def make_batch(step: int, rows: range) -> dict:
        generator = step_generator(config.seed, step)
        index = torch.randint(len(train_data.images), (plan.batch_size,), generator=generator)
        use_caption = torch.rand(plan.batch_size, generator=generator) < config.caption_mix
        images = augment(to_float(train_data.images[index]), config.shift, config.flip, generator)
        rows = list(rows)
        batch = train_data.batch(index[rows], use_caption[rows])
        return {
            **batch,
            "images": images[rows],
            "protagonist": train_data.labels["protagonist"][index[rows]],
            "style": train_data.labels["style"][index[rows]],
        }

    def loss_fn(model: Judges, batch: dict) -> tuple[torch.Tensor, dict]:
        character = F.cross_entropy(model.character(batch["images"]), batch["protagonist"])
        style = F.cross_entropy(model.style(batch["images"]), batch["style"])
        clip, _ = model.image_text(batch["images"], batch["ids"], batch["mask"], batch["text_index"])
        return character + style + clip, {
            "character_loss": character.detach(),
            "style_loss": style.detach(),
            "clip_loss": clip.detach(),
        }

    def evaluate(model: Judges) -> dict:
        scores = judge_metrics(model, val_data, "val")
        return {k: scores[k] for k in ("val_character_accuracy", "val_style_accuracy", "val_clip_top1")}

    prepare_workdir(
        workdir,
        {
            "stage": JUDGES,
            "preset": preset,
            "plan": asdict(plan),
            "config": asdict(config),
            "data": str(data_root.resolve()),
        },
        run.resume,
    )
    result = run.fit(
        judges,
        make_batch,
        loss_fn,
        plan,
        workdir,
        evaluate=evaluate,
        desc=f"stage 0 judges ({schedule})",
    )
    if run.interrupted(plan):
        return {"interrupted_at": stop_after, "workdir": str(workdir)}
    judges.eval()
    test_data = load_pairs(data_root, "test", text_tokenizer, config.text.max_length)
    metrics = {**judge_metrics(judges, val_data, "val"), **judge_metrics(judges, test_data, "test")}
    manifest = {
        "stage": JUDGES,
        "name": JUDGES,
        "config_hash": judge_hash(config),
        "config": asdict(config),
        **base_manifest(run, JUDGES, plan, config.seed, data_root),
        "text_tokenizer": TEXT_TOKENIZER,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "metrics": metrics,
        "history": result.history[:: max(1, len(result.history) // 100)],
    }

    save_artifact(out, judges.state_dict(), manifest, half=schedule == "reference")
    text_tokenizer.save_pretrained(out / TEXT_TOKENIZER)
    return manifest


def load_judges(preset: Preset) -> Judges:
    """The judges: the reference checkpoint, else a quick artifact. Never trains: a missing one is a `LabError`
    naming `labkit train stage0`."""
    judges, _ = load_judges_artifact(require(JUDGES, preset.name), preset, judge_config(preset))
    return judges
