"""One cell of the long-story ablation: policy × story length × de-tokenizer adaptation × seeds (issue 6).

The paper's Table 2 continues stories to 25 segments under four attention policies and scores the images
(FID, CLIP score); its Table 4 compares the de-tokenizer before and after adaptation. A cell here does the same
at the lab's scale, with the lab's offline metrics (`labkit.metrics.scores`):

1. **Generate** (`generate_stories`): for each of the cell's `seeds` seeds, `stories` test-story openings (the
   first frame's caption and true features) continued by the trained MLLM under one KV-cache policy, text
   written greedily, images regressed and fed back. Generation does not depend on the de-tokenizer nor on the
   seed (only the openings do), so cells share it through an on-disk cache keyed by the stories continued.
   All of a cell's stories run as one batch (`labkit.inference.generate.generate_stories`, each story with its
   own cache): a forward of the tiny model costs about the same for one story or nine. KV sizes stay exact per
   story; a segment's wall time is the batch's, shared evenly between its stories.
2. **Draw** (`draw_images`): every regressed feature set through the chosen de-tokenizer (`off` = stage 1,
   `official` / `full` = stage 3's two modes), batched, one call per seed with that seed's noise.
3. **Score** (`labkit.experiments.cell_scores`: `score_cell`): judge metrics per segment index and over the
   whole cell; text repetition; teacher-forced perplexity and feature error of the ground-truth stories
   (`teacher_forced`; they involve no images, so one cell per policy is enough); time and KV size per segment.

A *unit* is one (seed, story) pair. Besides the cell-level numbers, a cell records each unit's metrics
(`metrics.units`), each story's teacher-forced NLL (`metrics.teacher_forced.per_story`) and the judge features
behind the FID-analogue (`fid_features.safetensors`), so that the report can bootstrap confidence intervals over
stories and compare policies story by story (same units, paired differences).

The KV window defaults to the training length (`training_window_tokens`: what `chunk_length` segments take in
stage 2's layout); `budget="matched"` gives the window and sink policies the entries mm-sink is capped at.

`metrics` hold only numbers that the seed fixes (two runs agree exactly); wall-clock numbers live in `timings`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from labkit.core.artifacts import require, weights_hash
from labkit.core.atomic import save_torch, write_bytes, write_text
from labkit.core.devices import default_device
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import artifacts_folder
from labkit.core.presets import Preset, get_preset
from labkit.data.frames import load_frames
from labkit.data.layout import build_layout
from labkit.data.storystream_mini import ensure_dataset
from labkit.experiments.cache_trace import policy_params
from labkit.experiments.cell_scores import judge_features, score_cell, teacher_forced, timings, unit_scores
from labkit.inference.generate import STRATEGIES, StoryRun, generate_story
from labkit.inference.generate import generate_stories as generate_batch
from labkit.training.stage0 import features_for_split, load_judges
from labkit.training.stage1 import load_detokenizer_artifact
from labkit.training.stage2 import NAME, load_mllm

ADAPTATIONS = {"off": "detokenizer", "official": "detokenizer_official", "full": "detokenizer_full"}
BUDGETS = ("training", "matched")
MATCHED_POLICIES = ("window", "sink")  # the policies whose window `budget="matched"` sets to mm-sink's cap
STRIP_SEGMENTS = (1, 10, 25)  # 1-based segments shown in story strips, as the paper's figures
FID_FEATURES = "fid_features.safetensors"
# Images de-tokenized per UNet/VAE call. Smaller batches stay in the CPU's caches: at tiny on one thread, 128 images
# took 11.2 s in batches of 16, 12.0 s of 32, 14.7 s of 128 (the VAE decode alone 1.3 s vs 2.3 s for 64 images).
# The noise is drawn for all images at once, so the batch size does not change which noise an image gets.
DRAW_BATCH = 16


@dataclass(frozen=True)
class CellConfig:
    """Everything that decides a cell's numbers (its id and cache keys come from these fields)."""

    policy: str = "mm-sink"
    segments: int = 25
    adaptation: str = "off"
    seed: int = 0
    seeds: int = 1  # the cell runs seeds seed, seed+1, ..., seed+seeds-1 (models loaded once)
    stories: int = 4  # per seed
    # Cache sizes in tokens. window None = the training length (`training_window_tokens`, resolved by
    # `resolve_config`; about 330 tokens at tiny, where a segment is about 33 tokens and training saw 10).
    window: int | None = None
    sink: int = 4
    cap: int = 384
    budget: str = "training"  # "matched": window and sink policies hold mm-sink's `cap` entries in all
    window_images: int = 8  # mm-sink-as-coded keeps this many images, as the official slices
    recompute_segments: int = 8  # recompute-window re-encodes this many segments
    sample_steps: int = 10
    guidance_scale: float = 3.0
    teacher_forced: bool = True  # also score the ground-truth stories under the policy (text PPL, feature error)
    preset: str = "tiny"

    def check(self) -> None:
        """Refuse bad parameters before any work, naming the parameter."""
        if self.policy not in STRATEGIES:
            raise ParameterError("policy", f"unknown policy {self.policy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.adaptation is False:  # YAML 1.1 reads a bare `off` as false
            raise ParameterError("adaptation", 'got false: write "off" in quotes in YAML grids')
        if self.adaptation not in ADAPTATIONS:
            raise ParameterError(
                "adaptation", f"unknown adaptation {self.adaptation!r}; choose one of {', '.join(ADAPTATIONS)}"
            )
        if self.budget not in BUDGETS:
            raise ParameterError("budget", f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        optional = ("window",)  # None: resolved from the data (the training length)
        for name in (
            "segments",
            "seeds",
            "stories",
            "window",
            "sink",
            "cap",
            "window_images",
            "recompute_segments",
            "sample_steps",
        ):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer (got {value!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParameterError("seed", f"must be an integer >= 0 (got {self.seed!r})")
        if self.segments < 2:
            raise ParameterError("segments", f"must be >= 2: segment 1 is the given opening (got {self.segments})")
        if self.budget == "matched" and self.policy in MATCHED_POLICIES:
            if self.cap <= self.sink:
                raise ParameterError("cap", f"budget 'matched' needs cap > sink ({self.sink}), got {self.cap}")
            # an explicit window that disagrees with the budget would be silently ignored: refuse it instead
            if self.window is not None and self.window != matched_window(self):
                raise ParameterError(
                    "window",
                    f"budget 'matched' sets the {self.policy} window to {matched_window(self)} (mm-sink's cap "
                    f"{self.cap} entries in all); leave window unset (got {self.window})",
                )

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    @property
    def cell_id(self) -> str:
        # the one-seed, training-budget id is unchanged, so older reports and caches keep their names
        cell = f"{self.policy}-s{self.segments}-{self.adaptation}-seed{self.seed}"
        if self.seeds > 1:
            cell += f"-seeds{self.seeds}"
        if self.budget == "matched":
            cell += "-matched"
        return cell

    def cache_params(self) -> dict:
        """The cache sizes the policy takes; needs a resolved window (`resolve_config`)."""
        if self.window is None:
            # `policy_params` would fill in its own default: a cell must never run with a window it did not record
            raise LabError("the cell's window is not resolved yet: call resolve_config(config, inputs) first")
        return policy_params(
            self.policy, window=self.window, sink=self.sink, cap=self.cap, window_images=self.window_images
        )


@dataclass
class CellInputs:
    """What a cell reads: the trained parts and the test split (loaded once, shared by cells in a process)."""

    model: object  # SeedStoryMLLM
    tokenizer: object  # StoryTokenizer
    judges: object  # Judges
    frames: object  # SplitFrames of the test split
    features: torch.Tensor  # [S, F, N, D] true features of the test split
    mllm_key: str  # identifies the MLLM weights, for the generation cache


def load_inputs(preset: Preset, data_root: Path | str | None = None, progress: bool = True) -> CellInputs:
    """The reference (or quick) MLLM and judges, and the test split of `data_root` (default: the preset's data set)."""
    folder = require(NAME, preset.name)
    model, tokenizer, _ = load_mllm(folder, preset)
    root = Path(data_root) if data_root else ensure_dataset(preset, progress)
    return CellInputs(
        model.to(default_device()),  # `labkit report --device` (the judges score on the CPU, in fp32)
        tokenizer,
        load_judges(preset),
        load_frames(root, "test"),
        features_for_split(preset, "test", root, progress),
        weights_hash(folder),
    )


def training_window_tokens(tokenizer, captions: Sequence[Sequence[str]], chunk_length: int, num_queries: int) -> int:
    """The training length in tokens: the mean length of `chunk_length` consecutive segments in the official
    layout (`build_layout`: `<s>`, captions, image blocks and `</s>`, the longest sample stage 2 lays out), over
    every story of `captions` cut as stage 2 cuts its splits (non-overlapping chunks, incomplete tails dropped)."""
    lengths = [
        len(build_layout(story[start : start + chunk_length], tokenizer, num_queries, (), ()))
        for story in captions
        for start in range(0, len(story) - chunk_length + 1, chunk_length)
    ]
    if not lengths:
        raise ParameterError(
            "window", f"no story has {chunk_length} segments to measure the training length on: give window"
        )
    return round(sum(lengths) / len(lengths))


def matched_window(config: CellConfig) -> int:
    """The window that gives the window or sink policy mm-sink's `cap` entries in all."""
    return config.cap if config.policy == "window" else config.cap - config.sink


def resolve_config(config: CellConfig, inputs: CellInputs) -> CellConfig:
    """`config` with its window in tokens: the training length when None (from the test stories and the MLLM's
    tokenizer), `matched_window` for the window and sink policies under `budget="matched"`. Idempotent and cheap."""
    if config.budget == "matched" and config.policy in MATCHED_POLICIES:
        # mm-sink holds at most `cap` entries; the matched policies then hold as many: window keeps `cap` recent
        # tokens, sink keeps `sink` first tokens + `cap - sink` recent ones. Other policies take no window budget.
        return replace(config, window=matched_window(config))
    if config.window is None:
        chunk_length = get_preset(config.preset).data.chunk_length
        window = training_window_tokens(
            inputs.tokenizer, inputs.frames.captions, chunk_length, inputs.model.num_queries
        )
        return replace(config, window=window)
    return config


def opening_indices(config: CellConfig, available: int) -> list[int]:
    """Which test stories a cell continues for its seed `config.seed`: `stories` consecutive ones, starting where
    the seed says (so consecutive seeds continue different stories while the split has enough)."""
    if config.stories > available:
        raise ParameterError("stories", f"the test split has {available} stories, asked for {config.stories}")
    start = (config.seed * config.stories) % available
    return [(start + k) % available for k in range(config.stories)]


def cell_units(config: CellConfig, available: int) -> list[tuple[int, int]]:
    """The cell's units, (seed, test-story index) pairs: seed by seed, each seed's openings in order."""
    return [
        (seed, story) for seed in config.seed_list for story in opening_indices(replace(config, seed=seed), available)
    ]


def _generation_key(config: CellConfig, inputs: CellInputs, units: list[tuple[int, int]]) -> str:
    # No seed here on purpose: generation is greedy and reads no noise, so cells that continue the same stories
    # share the result; different stories (or sizes, or weights) get different keys. The stories are generated
    # as one batch, whose make-up changes float rounding, so the key lists every story of the batch in order.
    fields = {
        "policy": config.policy,
        "segments": config.segments,
        "params": config.cache_params(),
        "recompute": config.recompute_segments,
        "batch": [inputs.frames.story_ids[story] for _, story in units],
        "mllm": inputs.mllm_key,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def generate_stories(
    config: CellConfig, inputs: CellInputs, cache_dir: Path | None = None, progress: bool = True
) -> list[StoryRun]:
    """Every unit's story (`cell_units` order: seed by seed), written as one batch, or read from `cache_dir`
    when an identical generation already ran (the de-tokenizer cells of one policy share it)."""
    config = resolve_config(config, inputs)
    units = cell_units(config, inputs.frames.stories)
    cache = cache_dir / f"{config.policy}-{_generation_key(config, inputs, units)}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=False)
    runs = generate_batch(
        inputs.model,
        inputs.tokenizer,
        [(inputs.frames.captions[story][0], inputs.features[story, 0]) for _, story in units],
        segments=config.segments,
        policy=config.policy,
        params=config.cache_params(),
        recompute_segments=config.recompute_segments,
        progress=progress,
    )
    for run in runs:
        run.steps = [_light(step) for step in run.steps]
    if cache is not None:
        save_torch(runs, cache)
    return runs


def _light(step):
    """Drop the per-token position lists (up to thousands of ints per step): a cell needs sizes and times."""
    step.kept_positions, step.rotation_positions = [], None
    return step


def load_detokenizer(adaptation: str, preset: Preset):
    name = ADAPTATIONS[adaptation]
    folder, stage = require(name, preset.name), "stage1" if adaptation == "off" else "stage3"
    return load_detokenizer_artifact(folder, preset, stage)[0].to(default_device())


def tell_story(
    inputs: CellInputs,
    detokenizer,
    policy: str = "mm-sink",
    segments: int = 25,
    story: int = 0,
    window: int = 256,
    sink: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> tuple[StoryRun, torch.Tensor]:
    """One test story's opening continued under `policy` and drawn: (the run, uint8 images [segments, 3, H, W]).
    The quickstart's widget calls this; `cap` grows with the window so any window is valid for `mm-sink`."""
    config = CellConfig(
        policy=policy, segments=segments, stories=1, window=window, sink=sink, cap=window + sink + 128, seed=seed
    )
    config.check()
    if not 0 <= story < inputs.frames.stories:
        raise ParameterError("story", f"must be in 0..{inputs.frames.stories - 1} (got {story})")
    run = generate_story(
        inputs.model,
        inputs.tokenizer,
        inputs.frames.captions[story][0],
        inputs.features[story, 0],
        segments=segments,
        policy=policy,
        params=config.cache_params(),
    )
    return run, draw_images(detokenizer, [run], config, progress)[0]


def draw_images(detokenizer, runs: list[StoryRun], config: CellConfig, progress: bool = True) -> torch.Tensor:
    """uint8 images [stories, segments, 3, H, W] from every story's regressed features, in one batched call."""
    features = torch.stack([f for run in runs for f in run.features])
    images = detokenizer.sample(
        features,
        steps=config.sample_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        batch_size=DRAW_BATCH,
        progress=progress,
    )
    return images.reshape(len(runs), config.segments, *images.shape[1:])


def strip_segments(length: int) -> list[int]:
    """1-based segments a story strip shows: STRIP_SEGMENTS within the story, and its last segment."""
    picks = [s for s in STRIP_SEGMENTS if s <= length]
    return picks + ([length] if length not in picks else [])


def strip_image(images: torch.Tensor, rows: int = 2) -> torch.Tensor:
    """uint8 [3, H', W']: the first `rows` stories at `strip_segments`, side by side."""
    grid = images[:rows, [s - 1 for s in strip_segments(images.shape[1])]]  # [rows, k, 3, H, W]
    return torch.cat([torch.cat(list(row), dim=-1) for row in grid], dim=-2)


def run_cell(
    config: CellConfig,
    out: Path | str,
    inputs: CellInputs | None = None,
    data_root: Path | str | None = None,
    progress: bool = True,
) -> dict:
    """Generate, draw and score one cell (every seed of it); write `out`/metrics.json, `out`/strip.png,
    `out`/images.pt and `out`/fid_features.safetensors; return the record (the content of metrics.json)."""
    import io
    import time

    from PIL import Image
    from safetensors.torch import save as safetensors_bytes

    config.check()
    preset = get_preset(config.preset)  # the cell's one resolution of its preset name
    start = time.perf_counter()
    inputs = inputs or load_inputs(preset, data_root, progress)
    config = resolve_config(config, inputs)  # the window the cell runs with is the one its record shows
    units = cell_units(config, inputs.frames.stories)
    detokenizer = load_detokenizer(config.adaptation, preset)
    runs = generate_stories(config, inputs, artifacts_folder(preset.name) / "stories", progress)
    drawn = []
    for seed in config.seed_list:  # seed by seed, in the order of `units`, each seed with its own noise
        seed_runs = [run for run, (unit_seed, _) in zip(runs, units) if unit_seed == seed]
        drawn.append(draw_images(detokenizer, seed_runs, replace(config, seed=seed, seeds=1), progress))
    images = _concat(drawn)  # [units, S, 3, H, W]
    stories = [story for _, story in units]
    features = judge_features(images, inputs)
    scores = score_cell(images, runs, stories, inputs, features)
    scores["units"] = unit_scores(images, runs, units, inputs)
    scores["teacher_forced"] = (
        teacher_forced(
            inputs,
            stories,
            segments=config.segments,
            policy=config.policy,
            params=config.cache_params(),
            recompute_segments=config.recompute_segments,
            chunk_length=preset.data.chunk_length,
        )
        if config.teacher_forced
        else None
    )
    record = {
        "cell": config.cell_id,
        "parameters": asdict(config),
        "metrics": scores,
        "timings": timings(runs),
        "captions": [run.captions for run in runs[:2]],
        "files": {"fid_features": FID_FEATURES},  # relative to the cell's folder
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    out = Path(out)
    buffer = io.BytesIO()
    Image.fromarray(strip_image(images).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    write_bytes(out / "strip.png", buffer.getvalue())
    save_torch(images, out / "images.pt")  # the notebook's strips and curves; not part of the report
    tensors = {name: value.detach().float().contiguous().cpu() for name, value in features.items()}
    write_bytes(out / FID_FEATURES, safetensors_bytes(tensors))
    record = finite(record)
    write_text(out / "metrics.json", json.dumps(record, indent=1) + "\n")
    return record


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` along dim 0 that keeps the parts' memory layout. The de-tokenizer returns channels-last images,
    and the judges' convolutions round differently on a contiguous copy (about 1e-7): a one-seed cell would no
    longer repeat the numbers of earlier reports, nor a unit of a many-seed cell those of its one-seed cell."""
    order = sorted(range(parts[0].dim()), key=lambda d: -parts[0].stride(d))  # outermost dimension first
    joined = torch.cat([part.permute(order) for part in parts], dim=order.index(0))
    return joined.permute([order.index(d) for d in range(len(order))])


def finite(value):
    """`value` with NaN and infinities replaced by None, recursively: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
