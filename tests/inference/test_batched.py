"""A batch of stories, each with its own cache (labkit.caches.ragged, generate_stories, score_stories), writes
and scores what each story would alone: the reference MLLM on the committed sample stories, with caches small
enough to evict within a few segments, so the rows hold different entries and write captions of different lengths."""

from __future__ import annotations

import pytest
import torch

from labkit.caches import make_cache
from labkit.caches.ragged import RaggedCache
from labkit.core.errors import ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.experiments.story_ablation import load_inputs
from labkit.inference.generate import generate_stories, generate_story
from labkit.inference.long_context import score_stories, score_story

SAMPLE = project_root() / "data_samples" / "storystream-mini"
STORIES, SEGMENTS = 2, 6  # the sample's test split has 2 stories
# sizes that evict within SEGMENTS segments (a tiny segment is about 33 tokens with its 16-slot image)
SMALL = {
    "sink": {"sink": 4, "window": 60},
    "mm-sink": {"sink": 4, "window": 60, "cap": 120},
    "mm-sink-as-coded": {"sink": 4, "window": 60, "window_images": 2},
    "recompute-window": {},
}


@pytest.fixture(scope="module")
def inputs():
    return load_inputs(get_preset("tiny"), SAMPLE, progress=False)


def _openings(inputs):
    return [(inputs.frames.captions[i][0], inputs.features[i, 0]) for i in range(STORIES)]


@pytest.mark.parametrize("policy", sorted(SMALL))
def test_a_batch_writes_what_each_story_writes_alone(inputs, policy):
    params = SMALL[policy]
    alone = [
        generate_story(
            inputs.model, inputs.tokenizer, caption, features, SEGMENTS, policy, params, recompute_segments=2
        )
        for caption, features in _openings(inputs)
    ]
    batch = generate_stories(
        inputs.model, inputs.tokenizer, _openings(inputs), SEGMENTS, policy, params, recompute_segments=2
    )
    for one, row in zip(alone, batch):
        assert row.captions == one.captions and row.token_ids == one.token_ids and row.token_types == one.token_types
        torch.testing.assert_close(torch.stack(row.features), torch.stack(one.features), atol=1e-4, rtol=0)
        assert [s.kv_entries for s in row.steps] == [s.kv_entries for s in one.steps]
        assert [s.kept_positions for s in row.steps] == [s.kept_positions for s in one.steps]
    # the rows really were ragged: stories of different lengths, and (but for recompute) caches that evicted
    assert len({len(run.token_ids) for run in batch}) > 1
    if policy != "recompute-window":
        assert all(run.steps[-1].kv_entries < len(run.token_ids) for run in batch)


@pytest.mark.parametrize("policy", ["mm-sink", "recompute-window"])
def test_a_batch_scores_what_each_story_scores_alone(inputs, policy):
    stories = [(inputs.frames.captions[i][:SEGMENTS], inputs.features[i, :SEGMENTS]) for i in range(STORIES)]
    params = SMALL[policy]
    alone = [
        score_story(inputs.model, inputs.tokenizer, c, f, policy, params, recompute_segments=2) for c, f in stories
    ]
    batch = score_stories(inputs.model, inputs.tokenizer, stories, policy, params, recompute_segments=2)
    for one, row in zip(alone, batch):
        assert row.kv_entries == one.kv_entries
        torch.testing.assert_close(torch.tensor(row.nll[1:]), torch.tensor(one.nll[1:]), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(row.cosine_error[1:]), torch.tensor(one.cosine_error[1:]), atol=1e-4, rtol=0
        )


def test_batches_refuse_what_they_cannot_do(inputs):
    stories = [(inputs.frames.captions[i][: SEGMENTS - i], inputs.features[i, : SEGMENTS - i]) for i in range(2)]
    with pytest.raises(ParameterError, match="stories"):  # one batch needs equal story lengths
        score_stories(inputs.model, inputs.tokenizer, stories, "dense")
    with pytest.raises(ParameterError, match="openings"):
        generate_stories(inputs.model, inputs.tokenizer, [], SEGMENTS, "dense")
    with pytest.raises(ParameterError, match="captions"):
        generate_stories(inputs.model, inputs.tokenizer, _openings(inputs), SEGMENTS, "dense", captions=[["a"]])
    ragged = RaggedCache([make_cache("dense", inputs.model.causal_lm.config) for _ in range(2)])
    with pytest.raises(RuntimeError, match="4D mask"):  # the model's own causal mask would ignore the rows
        ragged.get_mask_sizes(1)
    with pytest.raises(ValueError, match="one id list per row"):
        ragged.inputs([0, 1], [[1]], "cpu")


@pytest.mark.parametrize("policy", ["mm-sink", "recompute-window"])
def test_on_segment_streams_every_segment_and_stop_generation_ends_the_stories_there(inputs, policy):
    from labkit.inference.generate import StopGeneration

    seen = []

    def hook(runs):
        seen.append([len(run.captions) for run in runs])
        if len(runs[0].captions) == 3:
            raise StopGeneration

    runs = generate_stories(
        inputs.model,
        inputs.tokenizer,
        _openings(inputs),
        SEGMENTS,
        policy,
        SMALL[policy],
        recompute_segments=2,
        on_segment=hook,
    )
    assert seen == [[1, 1], [2, 2], [3, 3]]  # the opening, then each segment as it is written
    full = generate_stories(
        inputs.model, inputs.tokenizer, _openings(inputs), SEGMENTS, policy, SMALL[policy], recompute_segments=2
    )
    for stopped, whole in zip(runs, full):
        assert len(stopped.captions) == len(stopped.steps) == 3
        assert stopped.captions == whole.captions[:3]  # what was written before the stop is what a full run writes
        assert stopped.token_ids and whole.token_ids[: len(stopped.token_ids)] == stopped.token_ids
