"""`labkit trace-cache`: which story positions each KV-cache policy holds after every segment.

The JSON it writes is what the KV-occupancy widget and plots read::

    {"policy", "params", "token_ids", "token_types",
     "steps": [{"segment", "kept_positions", "kv_bytes", "seconds"}, ...]}   # one step per finished segment

`--random` traces a random tiny model whose captions are all exactly `caption_tokens` long, so the layout
is known without any training; `--model` traces a trained stage-2 artifact writing its own captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from labkit.core.atomic import write_text
from labkit.core.errors import ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import PRESETS
from labkit.data.frames import load_frames
from labkit.data.storystream_mini import load_tokenizer
from labkit.inference.generate import STRATEGIES, generate_story
from labkit.models.mllm import SeedStoryMLLM
from labkit.training.stage0 import features_for_split
from labkit.training.stage2 import load_mllm

# Tiny-preset defaults: a window about the length the tiny MLLM trained on (10 segments of ~30 tokens).
DEFAULT_PARAMS = {"window": 256, "sink": 4, "cap": 384, "window_images": 8}
OPENING = "Once upon a time, Mira, a small red round creature with a yellow hat, lived in the quiet forest."


def policy_params(
    policy: str,
    window: int | None = None,
    sink: int | None = None,
    cap: int | None = None,
    window_images: int | None = None,
) -> dict:
    """The cache sizes a policy takes, defaults filled in (recompute-window takes none: see `segments_kept`)."""
    given = {"window": window, "sink": sink, "cap": cap, "window_images": window_images}
    chosen = {k: DEFAULT_PARAMS[k] if v is None else v for k, v in given.items()}
    wanted = {
        "dense": (),
        "window": ("window",),
        "sink": ("sink", "window"),
        "mm-sink": ("sink", "window", "cap"),
        "mm-sink-as-coded": ("window_images",),
        "mm-sink-stale": ("sink", "window", "cap"),  # control: mm-sink's selection, keys never re-rotated
        "mm-sink-as-coded-rerotated": ("window_images",),  # control: the official selection, keys re-rotated
        "recompute-window": (),
    }
    if policy not in wanted:
        raise ParameterError("--policy", f"unknown policy {policy!r}; choose one of {', '.join(STRATEGIES)}")
    return {k: chosen[k] for k in wanted[policy]}


def trace_cache(
    policy: str,
    segments: int,
    model_path: str | Path | None = None,
    params: dict | None = None,
    caption_tokens: int = 8,
    recompute_segments: int = 8,
    seed: int = 0,
) -> dict:
    """Generate one story under `policy` and return its trace (see the module docstring)."""
    if segments < 1:
        raise ParameterError("--segments", f"must be >= 1 (got {segments})")
    if caption_tokens < 1:
        raise ParameterError("--caption-tokens", f"must be >= 1 (got {caption_tokens})")
    params = policy_params(policy) if params is None else params
    torch.manual_seed(seed)
    if model_path is None:
        preset = PRESETS["tiny"]
        tokenizer = load_tokenizer(project_root() / "data_samples" / "storystream-mini")
        model = SeedStoryMLLM(preset, tokenizer.vocab_size).eval()
        first = torch.randn(preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim)
        run = generate_story(
            model,
            tokenizer,
            OPENING,
            first,
            segments,
            policy,
            params,
            recompute_segments=recompute_segments,
            max_caption_tokens=caption_tokens,
            fixed_caption_tokens=True,
        )
    else:
        model, tokenizer, manifest = load_mllm(model_path, PRESETS["tiny"])
        sample = project_root() / "data_samples" / "storystream-mini"
        first = features_for_split(PRESETS["tiny"], "val", sample, progress=False)[0, 0]
        run = generate_story(
            model,
            tokenizer,
            load_frames(sample, "val").captions[0][0],
            first,
            segments,
            policy,
            params,
            recompute_segments=recompute_segments,
        )
    return {
        "policy": policy,
        "params": params,
        "token_ids": run.token_ids,
        "token_types": run.token_types,
        "captions": run.captions,
        "steps": [
            {
                "segment": s.segment,
                "kept_positions": s.kept_positions,
                "kv_bytes": s.kv_bytes,
                "kv_entries": s.kv_entries,
                "seconds": round(s.seconds, 5),
                "rotation_positions": s.rotation_positions
                if s.rotation_positions is not None
                else list(range(s.kv_entries)),
            }
            for s in run.steps
        ],
    }


def write_trace(trace: dict, out: Path | str) -> None:
    write_text(out, json.dumps(trace) + "\n")
