"""Teacher-forced long-context evaluation: the attention_sinks perplexity curve, story edition (issue 4).

A test story is fed segment by segment through one KV-cache policy, the ground truth at every step:
`[INST]` + caption (its tokens scored: text NLL), then `<img>` + the query slots as a look-ahead (the
regressed features scored against the true ones: cosine error), then the true image's features through the
input resampler. Plotting both per segment index shows what happens past the training length (10 segments):
StreamingLLM reports window attention collapsing once the first tokens leave, sinks staying flat, and dense
attention degrading past the trained length.

`recompute-window` re-encodes `<s>` + the last K segments for every segment, as the released code.
Captions are fed as one chunk per forward, so eviction happens between chunks, not inside one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from labkit.caches import make_cache
from labkit.core.errors import ParameterError
from labkit.data.text_tokenizer import StoryTokenizer
from labkit.inference.generate import STRATEGIES, _dense_writer, _opening, _Writer, layout_cache_params
from labkit.models.mllm import SeedStoryMLLM, cosine_loss


@dataclass
class SegmentScores:
    nll: list[float]  # mean NLL of each segment's caption tokens and `<img>` (segment 0: not scored, NaN)
    cosine_error: list[float]  # 1 - cos of each regressed image (segment 0: NaN)
    kv_entries: list[int]


def _score_segment(
    writer: _Writer, captions: list[str], features: torch.Tensor, hidden_before: torch.Tensor
) -> tuple[list[float], list[float]]:
    """Feed one ground-truth segment to every story (row k: `captions[k]`, true features `features[k]`);
    return each story's (caption NLL, image cosine error). `hidden_before` [B, q, H]: the previous forward's."""
    t, rows = writer.tokenizer, writer.all_rows
    ids = [[t.inst_id, *t.encode(caption)] for caption in captions]
    hidden = writer.feed(rows, ids, [["text"] * len(row_ids) for row_ids in ids])
    regressed = writer.regress_next_image(rows)
    nll, error = [], []
    for k, row_ids in enumerate(ids):
        # predictions for ids[1:] come from positions ids[:-1]; `[INST]` is predicted by the previous segment's end
        states = torch.cat([hidden_before[k : k + 1, -1:], hidden[k : k + 1, : len(row_ids)]], dim=1)
        logits = writer.head(states).float()[0]
        targets = torch.tensor(row_ids + [t.boi_id], device=logits.device)
        nll.append(float(F.cross_entropy(logits, targets)))
        error.append(float(cosine_loss(regressed[k : k + 1], features[k : k + 1])))
    return nll, error


@torch.no_grad()
def score_story(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    captions: list[str],
    features: torch.Tensor,
    policy: str,
    params: dict | None = None,
    recompute_segments: int = 8,
) -> SegmentScores:
    """Per-segment NLL and cosine error of one story [S captions, features S×N×D] under one policy."""
    return score_stories(model, tokenizer, [(captions, features)], policy, params, recompute_segments)[0]


@torch.no_grad()
def score_stories(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    stories: list[tuple[list[str], torch.Tensor]],
    policy: str,
    params: dict | None = None,
    recompute_segments: int = 8,
) -> list[SegmentScores]:
    """`score_story` for stories of the same number of segments, fed as one batch (each story keeps its own
    cache: its scores are what it would get alone, up to float rounding)."""
    if policy not in STRATEGIES:
        raise ParameterError("policy", f"unknown policy {policy!r}; choose one of {', '.join(STRATEGIES)}")
    if not stories or len({len(captions) for captions, _ in stories}) != 1:
        raise ParameterError("stories", "give one or more stories, all with the same number of segments")
    model.eval()
    nan = float("nan")
    scores = [SegmentScores([nan], [nan], []) for _ in stories]
    if policy == "recompute-window":
        return _score_recompute(model, tokenizer, stories, recompute_segments, scores)
    params = layout_cache_params(policy, dict(params or {}), model, tokenizer)
    caches = [make_cache(policy, model.causal_lm.config, **params) for _ in stories]
    writer = _Writer(model, tokenizer, caches)
    hidden = _opening(writer, [(captions[0], features[0]) for captions, features in stories], False, True)
    _append(scores, None, writer)
    for segment in range(1, len(stories[0][0])):
        true = torch.stack([features[segment] for _, features in stories])
        measured = _score_segment(writer, [captions[segment] for captions, _ in stories], true, hidden)
        hidden = writer.image_block(writer.all_rows, true)
        _append(scores, measured, writer)
    return scores


def _append(scores: list[SegmentScores], measured: tuple[list[float], list[float]] | None, writer: _Writer) -> None:
    """Each story's scores of one segment (None: the opening, not scored) and its cache size after it."""
    for k, story in enumerate(scores):
        if measured is not None:
            story.nll.append(measured[0][k])
            story.cosine_error.append(measured[1][k])
        story.kv_entries.append(writer.caches[k].get_seq_length())


def _score_recompute(model, tokenizer, stories, window: int, scores: list[SegmentScores]) -> list[SegmentScores]:
    for segment in range(1, len(stories[0][0])):
        writer = _dense_writer(model, tokenizer, len(stories))
        first = max(0, segment - window)
        texts = [
            [
                ([tokenizer.inst_id] if kept > 0 else []) + tokenizer.encode(captions[kept])
                for kept in range(first, segment)
            ]
            for captions, _ in stories
        ]
        hidden = writer.reencode(texts, [list(features[first:segment]) for _, features in stories])
        true = torch.stack([features[segment] for _, features in stories])
        _append(scores, _score_segment(writer, [captions[segment] for captions, _ in stories], true, hidden), writer)
    for story in scores:
        story.kv_entries.insert(0, story.kv_entries[0] if story.kv_entries else 0)
    return scores


def long_context_curves(
    model: SeedStoryMLLM,
    tokenizer: StoryTokenizer,
    stories: list[tuple[list[str], torch.Tensor]],
    policies: dict[str, dict],
    recompute_segments: int = 8,
) -> dict[str, dict[str, list[float]]]:
    """Mean per-segment NLL and cosine error over `stories`, for each policy (name -> cache params)."""
    curves = {}
    for policy, params in policies.items():
        runs = score_stories(model, tokenizer, stories, policy, params, recompute_segments)
        curves[policy] = {
            "nll": torch.tensor([r.nll for r in runs]).nanmean(0).tolist(),
            "cosine_error": torch.tensor([r.cosine_error for r in runs]).nanmean(0).tolist(),
            "kv_entries": torch.tensor([r.kv_entries for r in runs], dtype=torch.float).mean(0).tolist(),
        }
    return curves
