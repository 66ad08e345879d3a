"""The scores of one long-story ablation cell: judge metrics per unit, per segment and overall, teacher-forced
scores per story, and the cell's time and KV memory per segment (issue 6).

`story_ablation.run_cell` generates and draws a cell's stories, then scores them here. A *unit* is one (seed,
story) pair: `images` are [units, S, 3, H, W], one `StoryRun` and one test-story index per unit. `inputs` is the
cell's `story_ablation.CellInputs` (these functions read its judges and test frames; `teacher_forced` also its
MLLM, tokenizer and true features). Segment 1 is the given opening, so the judge metrics cover segments 2..S.

- `judge_features`: the judge features behind the FID-analogue, kept per unit so the report can resample units.
- `score_cell`: judge metrics over all units together, overall and per segment index; text repetition.
- `unit_scores`: each unit's judge metrics, the evidence the report bootstraps over and pairs across policies.
- `teacher_forced`: perplexity and feature error of the ground-truth stories under the cell's policy, per story.
- `timings`: wall time and KV size per segment (wall-clock numbers: not fixed by the seed).
"""

from __future__ import annotations

import math

import torch

from labkit.inference.generate import StoryRun
from labkit.inference.long_context import score_stories
from labkit.metrics import scores as metrics


def judge_features(images: torch.Tensor, inputs) -> dict[str, torch.Tensor]:
    """The FID-analogue's judge features: `generated` [units, S-1, C] of every unit's segments 2..S (segment 1 is
    the given opening) and `real` [M, C] of every real test frame. Kept so the report can resample units."""
    units, segments = images.shape[:2]
    generated = inputs.judges.fid_features(images[:, 1:].flatten(0, 1))
    return {
        "generated": generated.reshape(units, segments - 1, -1),
        "real": inputs.judges.fid_features(inputs.frames.images.flatten(0, 1)),
    }


def score_cell(
    images: torch.Tensor,
    runs: list[StoryRun],
    stories: list[int],
    inputs,
    features: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Judge metrics over segments 2..S (segment 1 is the given opening) and per segment index, over all units
    together: images [units, S, 3, H, W], one run and one test-story index per unit (`features`: `judge_features`
    of the images, computed here when not given)."""
    judges, frames = inputs.judges, inputs.frames
    protagonist, style = frames.protagonist[stories, 0], frames.style[stories, 0]  # one label per story
    units, segments = images.shape[:2]
    features = features or judge_features(images, inputs)
    generated = images[:, 1:].flatten(0, 1)
    per_frame = lambda labels: labels.repeat_interleave(segments - 1)  # noqa: E731 - generated frames are unit-major
    consecutive = metrics.lpips_distances(images[:, 1:].flatten(0, 1), images[:, :-1].flatten(0, 1))
    similarity = [metrics.sentence_similarity(run.captions) for run in runs]
    overall = {
        # `fid_analogue` on the same features: the Fréchet distance of generated vs real frames
        "fid": metrics.frechet_distance(features["generated"].flatten(0, 1), features["real"]),
        "clip": metrics.clip_analogue(judges, generated, [c for run in runs for c in run.captions[1:]]),
        "char_acc": metrics.character_accuracy(judges, generated, per_frame(protagonist)),
        "style_consistency": metrics.style_consistency(judges, generated, per_frame(style)),
        "lpips": None if consecutive is None else float(consecutive.mean()),
        "distinct_2": sum(metrics.distinct_n(run.captions, 2) for run in runs) / units,
        "repeated_captions": sum(metrics.repeated_captions(run.captions) for run in runs) / units,
        "sentence_similarity": None if None in similarity else sum(similarity) / units,
    }
    per_segment = {
        "char_acc": [metrics.character_accuracy(judges, images[:, s], protagonist) for s in range(segments)],
        "style_consistency": [metrics.style_consistency(judges, images[:, s], style) for s in range(segments)],
        "clip": [
            metrics.clip_analogue(judges, images[:, s], [run.captions[s] for run in runs]) for s in range(segments)
        ],
        "lpips_consecutive": [None] * segments
        if consecutive is None
        else [None] + consecutive.reshape(units, segments - 1).mean(0).tolist(),
    }
    return {"overall": overall, "per_segment": per_segment}


def unit_scores(images: torch.Tensor, runs: list[StoryRun], units: list[tuple[int, int]], inputs) -> dict:
    """Each unit's judge metrics over its segments 2..S, with the functions `score_cell` uses for `overall`:
    the evidence the report bootstraps over and pairs across policies (a unit is a (seed, story) pair)."""
    judges, frames = inputs.judges, inputs.frames
    rows = {"seed": [seed for seed, _ in units], "story": [story for _, story in units]}
    rows.update(clip=[], char_acc=[], style_consistency=[])
    for unit, (run, (_, story)) in enumerate(zip(runs, units)):
        generated = images[unit, 1:]
        rows["clip"].append(metrics.clip_analogue(judges, generated, run.captions[1:]))
        rows["char_acc"].append(metrics.character_accuracy(judges, generated, frames.protagonist[story, 0]))
        rows["style_consistency"].append(metrics.style_consistency(judges, generated, frames.style[story, 0]))
    return rows


def teacher_forced(
    inputs,
    stories: list[int],
    *,
    segments: int,
    policy: str,
    params: dict,
    recompute_segments: int,
    chunk_length: int,
) -> dict | None:
    """Perplexity and image-feature cosine error of the ground-truth test stories `stories`, cut to `segments`
    segments, under the cache `policy` with `params` (a resolved `CellConfig.cache_params()`), overall and per
    story (None when the stories are shorter than `segments`). `chunk_length`: segments per training sample, which
    splits each story's NLL within / beyond the training length. Teacher forcing reads no noise: each distinct
    story is scored once, whatever the number of seeds that continue it."""
    if segments > inputs.frames.frames:
        return None
    stories = list(dict.fromkeys(stories))
    scores = score_stories(  # one batch: each story keeps its own cache
        inputs.model,
        inputs.tokenizer,
        [(inputs.frames.captions[i][:segments], inputs.features[i, :segments]) for i in stories],
        policy,
        params,
        recompute_segments,
    )
    nll = [sum(s.nll[k] for s in scores) / len(scores) for k in range(segments)]
    error = [sum(s.cosine_error[k] for s in scores) / len(scores) for k in range(segments)]
    return {
        "perplexity": metrics.perplexity(nll),
        "feature_cosine_error": _nanmean(error),
        "nll": nll,
        "cosine_error": error,
        "per_story": {
            "story": stories,
            "caption_nll": [_nanmean(s.nll[1:]) for s in scores],  # segments 2..S (segment 1 is not scored)
            "caption_nll_within": [nll_within_beyond(s.nll, chunk_length)[0] for s in scores],
            "caption_nll_beyond": [nll_within_beyond(s.nll, chunk_length)[1] for s in scores],
            "feature_cosine_error": [_nanmean(s.cosine_error) for s in scores],
        },
    }


def nll_within_beyond(nll: list[float], chunk_length: int) -> tuple[float, float]:
    """A story's mean caption NLL within the training length (1-based segments 2..chunk_length: the context fits
    what training showed) and beyond it (segments chunk_length+2..S: after the first eviction; NaN when the story
    is not that long). Segment 1 is the given opening, never scored."""
    return _nanmean(nll[1:chunk_length]), _nanmean(nll[chunk_length + 1 :])


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _opening_tokens(run: StoryRun) -> int:
    """Tokens of segment 1 in `run.token_ids`: `<s>`, the given caption and its image block up to `</img>`."""
    return run.token_types.index("eoi") + 1


def timings(runs: list[StoryRun]) -> dict:
    """Per-segment wall time and KV size, averaged over runs (segment 1 is the opening's prefill)."""
    segments = len(runs[0].steps)
    seconds = [sum(run.steps[s].seconds for run in runs) / len(runs) for s in range(segments)]
    kv_bytes = [sum(run.steps[s].kv_bytes for run in runs) // len(runs) for s in range(segments)]
    kv_entries = [sum(run.steps[s].kv_entries for run in runs) // len(runs) for s in range(segments)]
    result = {
        "seconds_per_segment": sum(seconds[1:]) / max(1, segments - 1),
        "seconds_last_segment": seconds[-1],
        "kv_bytes_last_segment": kv_bytes[-1],
        "kv_entries_last_segment": kv_entries[-1],  # entries per layer the cache holds after the last segment
        "seconds": seconds,
        "kv_bytes": kv_bytes,
        "kv_entries": kv_entries,
    }
    # Seconds of segments 2..S over the tokens they added to the story (`[INST]`, the written caption, the
    # image block), as `StoryRun.token_ids` records them: a cost that does not depend on how long captions are.
    if all("eoi" in run.token_types for run in runs):
        added = sum(len(run.token_ids) - _opening_tokens(run) for run in runs)
        spent = sum(step.seconds for run in runs for step in run.steps[1:])
        if added:
            result["seconds_per_token"] = spent / added
    return result
