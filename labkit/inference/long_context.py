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
from labkit.inference.generate import STRATEGIES, _cache_params, _Writer
from labkit.models.mllm import SeedStoryMLLM, cosine_loss


@dataclass
class SegmentScores:
    nll: list[float]  # mean NLL of each segment's caption tokens and `<img>` (segment 0: not scored, NaN)
    cosine_error: list[float]  # 1 - cos of each regressed image (segment 0: NaN)
    kv_entries: list[int]


def _score_segment(
    writer: _Writer, tokenizer: StoryTokenizer, caption: str, features: torch.Tensor, hidden_before: torch.Tensor
) -> tuple[float, float]:
    """Feed one ground-truth segment; return (caption NLL, image cosine error)."""
    ids = [tokenizer.inst_id, *tokenizer.encode(caption)]
    hidden = writer.feed(ids, ["text"] * len(ids))
    # predictions for ids[1:] come from positions ids[:-1]; `[INST]` is predicted by the previous segment's end
    states = torch.cat([hidden_before[:, -1:], hidden], dim=1)
    logits = writer.head(states).float()[0]
    targets = torch.tensor(ids + [tokenizer.boi_id], device=logits.device)
    nll = float(F.cross_entropy(logits, targets))
    regressed = writer.regress_next_image()
    error = float(cosine_loss(regressed.unsqueeze(0), features.unsqueeze(0)))
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
    if policy not in STRATEGIES:
        raise ParameterError("policy", f"unknown policy {policy!r}; choose one of {', '.join(STRATEGIES)}")
    model.eval()
    nan = float("nan")
    scores = SegmentScores([nan], [nan], [])
    if policy == "recompute-window":
        return _score_recompute(model, tokenizer, captions, features, recompute_segments, scores)
    cache = make_cache(policy, model.causal_lm.config, **_cache_params(policy, dict(params or {}), model, tokenizer))
    writer = _Writer(model, tokenizer, cache)
    opening = [tokenizer.bos_id, *tokenizer.encode(captions[0])]
    writer.feed(opening, ["bos"] + ["text"] * (len(opening) - 1))
    hidden = writer.image_block(features[0])
    scores.kv_entries.append(cache.get_seq_length())
    for segment in range(1, len(captions)):
        nll, error = _score_segment(writer, tokenizer, captions[segment], features[segment], hidden)
        hidden = writer.image_block(features[segment])
        scores.nll.append(nll)
        scores.cosine_error.append(error)
        scores.kv_entries.append(cache.get_seq_length())
    return scores


def _score_recompute(model, tokenizer, captions, features, window, scores: SegmentScores) -> SegmentScores:
    for segment in range(1, len(captions)):
        writer = _Writer(model, tokenizer, make_cache("dense", model.causal_lm.config))
        first = max(0, segment - window)
        texts = [
            ([tokenizer.inst_id] if kept > 0 else []) + tokenizer.encode(captions[kept])
            for kept in range(first, segment)
        ]
        hidden = writer.reencode(texts, list(features[first:segment]))
        nll, error = _score_segment(writer, tokenizer, captions[segment], features[segment], hidden)
        scores.nll.append(nll)
        scores.cosine_error.append(error)
        scores.kv_entries.append(writer.cache.get_seq_length())
    scores.kv_entries.insert(0, scores.kv_entries[0] if scores.kv_entries else 0)
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
        runs = [score_story(model, tokenizer, c, f, policy, params, recompute_segments) for c, f in stories]
        curves[policy] = {
            "nll": torch.tensor([r.nll for r in runs]).nanmean(0).tolist(),
            "cosine_error": torch.tensor([r.cosine_error for r in runs]).nanmean(0).tolist(),
            "kv_entries": torch.tensor([r.kv_entries for r in runs], dtype=torch.float).mean(0).tolist(),
        }
    return curves
