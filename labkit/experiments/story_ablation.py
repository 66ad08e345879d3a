"""One cell of the long-story ablation: policy × story length × de-tokenizer adaptation × seed (issue 6).

The paper's Table 2 continues stories to 25 segments under four attention policies and scores the images
(FID, CLIP score); its Table 4 compares the de-tokenizer before and after adaptation. A cell here does the same
at the lab's scale, with the lab's offline metrics (`labkit.metrics.scores`):

1. **Generate** (`generate_stories`): `stories` test-story openings (the first frame's caption and true
   features) continued by the trained MLLM under one KV-cache policy, text written greedily, images regressed
   and fed back. Generation does not depend on the de-tokenizer, so the three adaptation cells of a policy
   share it through an on-disk cache. Stories run one by one: at this size a batch would save little, and
   one story at a time keeps the per-segment timings and KV sizes exact.
2. **Draw** (`draw_images`): every regressed feature set through the chosen de-tokenizer (`off` = stage 1,
   `official` / `full` = stage 3's two modes), batched, with the cell's seed.
3. **Score** (`score_cell`): judge metrics per segment index and over the whole cell; text repetition;
   teacher-forced perplexity and feature error of the ground-truth stories (`teacher_forced`; they involve
   no images, so one cell per policy is enough).

`metrics` hold only numbers that the seed fixes (two runs agree exactly); wall-clock numbers live in `timings`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from labkit.core.artifacts import require, weights_hash
from labkit.core.atomic import save_torch, write_bytes, write_text
from labkit.core.errors import ParameterError
from labkit.core.paths import artifacts_folder
from labkit.core.presets import Preset, get_preset
from labkit.data.frames import load_frames
from labkit.data.storystream_mini import ensure_dataset
from labkit.experiments.cache_trace import policy_params
from labkit.inference.generate import STRATEGIES, StoryRun, generate_story
from labkit.inference.long_context import score_story
from labkit.metrics import scores as metrics
from labkit.training.stage0 import features_for_split, load_judges
from labkit.training.stage1 import load_detokenizer_artifact
from labkit.training.stage2 import NAME, load_mllm

ADAPTATIONS = {"off": "detokenizer", "official": "detokenizer_official", "full": "detokenizer_full"}
STRIP_SEGMENTS = (1, 10, 25)  # 1-based segments shown in story strips, as the paper's figures


@dataclass(frozen=True)
class CellConfig:
    """Everything that decides a cell's numbers (its id and cache keys come from these fields)."""

    policy: str = "mm-sink"
    segments: int = 25
    adaptation: str = "off"
    seed: int = 0
    stories: int = 4
    window: int = 256  # cache sizes in tokens (a tiny segment is about 40 tokens; training saw 10 segments)
    sink: int = 4
    cap: int = 384
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
        for name in (
            "segments",
            "stories",
            "window",
            "sink",
            "cap",
            "window_images",
            "recompute_segments",
            "sample_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer (got {value!r})")
        if self.segments < 2:
            raise ParameterError("segments", f"must be >= 2: segment 1 is the given opening (got {self.segments})")

    @property
    def cell_id(self) -> str:
        return f"{self.policy}-s{self.segments}-{self.adaptation}-seed{self.seed}"

    def cache_params(self) -> dict:
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
        model,
        tokenizer,
        load_judges(preset),
        load_frames(root, "test"),
        features_for_split(preset, "test", root, progress),
        weights_hash(folder),
    )


def opening_indices(config: CellConfig, available: int) -> list[int]:
    """Which test stories a cell continues: `stories` consecutive ones, starting where the seed says."""
    if config.stories > available:
        raise ParameterError("stories", f"the test split has {available} stories, asked for {config.stories}")
    start = (config.seed * config.stories) % available
    return [(start + k) % available for k in range(config.stories)]


def _generation_key(config: CellConfig, inputs: CellInputs) -> str:
    fields = {
        "policy": config.policy,
        "segments": config.segments,
        "params": config.cache_params(),
        "recompute": config.recompute_segments,
        "stories": [inputs.frames.story_ids[i] for i in opening_indices(config, inputs.frames.stories)],
        "mllm": inputs.mllm_key,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def generate_stories(
    config: CellConfig, inputs: CellInputs, cache_dir: Path | None = None, progress: bool = True
) -> list[StoryRun]:
    """The cell's stories, read from `cache_dir` when an identical generation already ran."""
    from tqdm.auto import tqdm

    cache = cache_dir / f"{config.policy}-{_generation_key(config, inputs)}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=False)
    runs = []
    for index in tqdm(
        opening_indices(config, inputs.frames.stories), desc=f"{config.policy}: stories", disable=not progress
    ):
        runs.append(
            generate_story(
                inputs.model,
                inputs.tokenizer,
                inputs.frames.captions[index][0],
                inputs.features[index, 0],
                segments=config.segments,
                policy=config.policy,
                params=config.cache_params(),
                recompute_segments=config.recompute_segments,
            )
        )
        runs[-1].steps = [_light(step) for step in runs[-1].steps]
    if cache is not None:
        save_torch(runs, cache)
    return runs


def _light(step):
    """Drop the per-token position lists (up to thousands of ints per step): a cell needs sizes and times."""
    step.kept_positions, step.rotation_positions = [], None
    return step


def load_detokenizer(adaptation: str, preset: Preset):
    name = ADAPTATIONS[adaptation]
    return load_detokenizer_artifact(require(name, preset.name), preset, "stage1" if adaptation == "off" else "stage3")[
        0
    ]


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
        features, steps=config.sample_steps, guidance_scale=config.guidance_scale, seed=config.seed, progress=progress
    )
    return images.reshape(len(runs), config.segments, *images.shape[1:])


def score_cell(images: torch.Tensor, runs: list[StoryRun], config: CellConfig, inputs: CellInputs) -> dict:
    """Judge metrics over segments 2..S (segment 1 is the given opening) and per segment index."""
    indices = opening_indices(config, inputs.frames.stories)
    judges, frames = inputs.judges, inputs.frames
    protagonist, style = frames.protagonist[indices, 0], frames.style[indices, 0]  # one label per story
    stories, segments = images.shape[:2]
    generated = images[:, 1:].flatten(0, 1)
    per_frame = lambda labels: labels.repeat_interleave(segments - 1)  # noqa: E731 - generated frames are story-major
    consecutive = metrics.lpips_distances(images[:, 1:].flatten(0, 1), images[:, :-1].flatten(0, 1))
    similarity = [metrics.sentence_similarity(run.captions) for run in runs]
    overall = {
        "fid": metrics.fid_analogue(judges, generated, frames.images.flatten(0, 1)),
        "clip": metrics.clip_analogue(judges, generated, [c for run in runs for c in run.captions[1:]]),
        "char_acc": metrics.character_accuracy(judges, generated, per_frame(protagonist)),
        "style_consistency": metrics.style_consistency(judges, generated, per_frame(style)),
        "lpips": None if consecutive is None else float(consecutive.mean()),
        "distinct_2": sum(metrics.distinct_n(run.captions, 2) for run in runs) / stories,
        "repeated_captions": sum(metrics.repeated_captions(run.captions) for run in runs) / stories,
        "sentence_similarity": None if None in similarity else sum(similarity) / stories,
    }
    per_segment = {
        "char_acc": [metrics.character_accuracy(judges, images[:, s], protagonist) for s in range(segments)],
        "style_consistency": [metrics.style_consistency(judges, images[:, s], style) for s in range(segments)],
        "clip": [
            metrics.clip_analogue(judges, images[:, s], [run.captions[s] for run in runs]) for s in range(segments)
        ],
        "lpips_consecutive": [None] * segments
        if consecutive is None
        else [None] + consecutive.reshape(stories, segments - 1).mean(0).tolist(),
    }
    return {"overall": overall, "per_segment": per_segment}


def teacher_forced(config: CellConfig, inputs: CellInputs) -> dict | None:
    """Perplexity and image-feature cosine error of the ground-truth test stories under the cell's policy
    (None when the stories are shorter than the cell)."""
    if config.segments > inputs.frames.frames:
        return None
    scores = [
        score_story(
            inputs.model,
            inputs.tokenizer,
            inputs.frames.captions[i][: config.segments],
            inputs.features[i, : config.segments],
            config.policy,
            config.cache_params(),
            config.recompute_segments,
        )
        for i in opening_indices(config, inputs.frames.stories)
    ]
    nll = [sum(s.nll[k] for s in scores) / len(scores) for k in range(config.segments)]
    error = [sum(s.cosine_error[k] for s in scores) / len(scores) for k in range(config.segments)]
    return {
        "perplexity": metrics.perplexity(nll),
        "feature_cosine_error": _nanmean(error),
        "nll": nll,
        "cosine_error": error,
    }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def timings(runs: list[StoryRun]) -> dict:
    """Per-segment wall time and KV size, averaged over stories (segment 1 is the opening's prefill)."""
    segments = len(runs[0].steps)
    seconds = [sum(run.steps[s].seconds for run in runs) / len(runs) for s in range(segments)]
    kv_bytes = [sum(run.steps[s].kv_bytes for run in runs) // len(runs) for s in range(segments)]
    return {
        "seconds_per_segment": sum(seconds[1:]) / max(1, segments - 1),
        "seconds_last_segment": seconds[-1],
        "kv_bytes_last_segment": kv_bytes[-1],
        "seconds": seconds,
        "kv_bytes": kv_bytes,
        "kv_entries": [sum(run.steps[s].kv_entries for run in runs) // len(runs) for s in range(segments)],
    }


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
    """Generate, draw and score one cell; write `out`/metrics.json and `out`/strip.png; return the record."""
    import io
    import time

    from PIL import Image

    config.check()
    preset = get_preset(config.preset)  # the cell's one resolution of its preset name
    start = time.perf_counter()
    inputs = inputs or load_inputs(preset, data_root, progress)
    runs = generate_stories(config, inputs, artifacts_folder(preset.name) / "stories", progress)
    images = draw_images(load_detokenizer(config.adaptation, preset), runs, config, progress)
    scores = score_cell(images, runs, config, inputs)
    scores["teacher_forced"] = teacher_forced(config, inputs) if config.teacher_forced else None
    record = {
        "cell": config.cell_id,
        "parameters": asdict(config),
        "metrics": scores,
        "timings": timings(runs),
        "captions": [run.captions for run in runs[:2]],
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    out = Path(out)
    buffer = io.BytesIO()
    Image.fromarray(strip_image(images).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    write_bytes(out / "strip.png", buffer.getvalue())
    save_torch(images, out / "images.pt")  # the notebook's strips and curves; not part of the report
    record = finite(record)
    write_text(out / "metrics.json", json.dumps(record, indent=1) + "\n")
    return record


def finite(value):
    """`value` with NaN and infinities replaced by None, recursively: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
