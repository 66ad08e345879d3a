"""Per-unit evidence of a long-story ablation cell (labkit.experiments.story_ablation): seeds, the training-length
window, the matched KV budget, per-unit and per-story metrics and the saved FID features."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from labkit.core.errors import ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.data.storystream_mini import load_tokenizer
from labkit.experiments.story_ablation import (
    CellConfig,
    cell_units,
    generate_stories,
    load_inputs,
    resolve_config,
    run_cell,
    training_window_tokens,
)

TINY = get_preset("tiny")
SAMPLE = project_root() / "data_samples" / "storystream-mini"


# ---- parameters (no model) ----------------------------------------------------------------------------------


def test_budget_and_window_are_checked_naming_the_parameter():
    CellConfig().check()  # window None (the training length) is valid
    with pytest.raises(ParameterError, match="budget"):
        CellConfig(budget="nosuch").check()
    with pytest.raises(ParameterError, match="window"):
        CellConfig(window=0).check()
    with pytest.raises(ParameterError, match="seeds"):
        CellConfig(seeds=0).check()
    with pytest.raises(ParameterError, match="window"):  # matched fixes the sink window: a different one is refused
        CellConfig(policy="sink", budget="matched", window=100).check()
    CellConfig(policy="sink", budget="matched", window=380).check()  # cap - sink: consistent


def test_cell_ids_name_extra_seeds_and_the_matched_budget():
    assert CellConfig(policy="sink", segments=25, seed=1).cell_id == "sink-s25-off-seed1"
    assert CellConfig(policy="sink", segments=25, seed=1, seeds=3).cell_id == "sink-s25-off-seed1-seeds3"
    assert CellConfig(policy="sink", segments=25, budget="matched").cell_id == "sink-s25-off-seed0-matched"


def test_units_are_seed_major_and_each_seed_continues_its_own_stories():
    assert cell_units(CellConfig(seed=0, seeds=2, stories=2), available=5) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert cell_units(CellConfig(seed=2, seeds=2, stories=2), available=5) == [(2, 4), (2, 0), (3, 1), (3, 2)]


def test_training_window_is_the_mean_official_layout_of_chunk_length_segments():
    tokenizer = load_tokenizer(SAMPLE)
    stories = [["A cat.", "The cat sat on a mat.", "It slept."], ["Mira ran home quickly.", "She ate.", "x"]]
    queries = 4

    def layout(captions):  # <s>, captions ([INST] before all but the first), image blocks, </s>
        text = sum(len(tokenizer.encode(c)) for c in captions) + len(captions) - 1
        return 1 + text + len(captions) * (queries + 2) + 1

    expected = round((layout(stories[0][:2]) + layout(stories[1][:2])) / 2)  # tails shorter than 2 are dropped
    assert training_window_tokens(tokenizer, stories, 2, queries) == expected
    with pytest.raises(ParameterError, match="window"):
        training_window_tokens(tokenizer, stories, 4, queries)


# ---- cells (the committed tiny checkpoints) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    return load_inputs(TINY, SAMPLE, progress=False)


def test_window_resolves_to_the_training_length_and_matched_gives_mm_sinks_cap(inputs):
    trained = training_window_tokens(
        inputs.tokenizer, inputs.frames.captions, TINY.data.chunk_length, inputs.model.num_queries
    )
    assert trained > 0 and resolve_config(CellConfig(policy="sink"), inputs).window == trained
    assert resolve_config(CellConfig(policy="sink", window=77), inputs).window == 77  # an explicit window wins
    matched = resolve_config(CellConfig(policy="sink", budget="matched", cap=300, sink=4), inputs)
    assert matched.sink + matched.window == 300  # sink: first tokens + recent ones = mm-sink's cap
    assert resolve_config(CellConfig(policy="window", budget="matched", cap=300), inputs).window == 300
    assert resolve_config(CellConfig(policy="mm-sink", budget="matched"), inputs).window == trained
    run = generate_stories(CellConfig(policy="window", budget="matched", segments=2, stories=1), inputs, progress=False)
    assert run[0].params == {"window": 384}  # what the cache was built with: mm-sink's default cap


@pytest.mark.slow
def test_a_two_seed_cell_records_units_per_story_scores_and_fid_features(inputs, tmp_path):
    config = CellConfig(policy="sink", segments=3, stories=2, seeds=2, sample_steps=2)
    record = run_cell(config, tmp_path / "cell", inputs, progress=False)
    assert record["cell"] == "sink-s3-off-seed0-seeds2"
    parameters = record["parameters"]
    trained = training_window_tokens(
        inputs.tokenizer, inputs.frames.captions, TINY.data.chunk_length, inputs.model.num_queries
    )
    assert parameters["window"] == trained and parameters["budget"] == "training" and parameters["seeds"] == 2

    units = record["metrics"]["units"]
    assert set(units) == {"seed", "story", "clip", "char_acc", "style_consistency"}
    assert all(len(values) == 2 * config.stories for values in units.values())
    assert sorted(set(units["seed"])) == [0, 1]
    assert [(s, k) for s, k in zip(units["seed"], units["story"])] == cell_units(config, inputs.frames.stories)
    # equal-sized units: the cell's accuracy is the mean of the units' (same metric functions)
    assert math.isclose(record["metrics"]["overall"]["char_acc"], sum(units["char_acc"]) / 4, abs_tol=1e-6)

    forced = record["metrics"]["teacher_forced"]
    per_story = forced["per_story"]
    assert per_story["story"] == list(dict.fromkeys(units["story"]))  # each distinct story once
    lengths = {name: len(values) for name, values in per_story.items()}
    assert set(lengths.values()) == {len(per_story["story"])}
    assert per_story["caption_nll_within"] == per_story["caption_nll"]  # 3 segments: all within the training length
    assert per_story["caption_nll_beyond"] == [None] * len(per_story["story"])  # none past it (NaN -> null)
    assert forced["perplexity"] > 1 and len(forced["nll"]) == 3

    timings = record["timings"]
    assert timings["kv_entries_last_segment"] == timings["kv_entries"][-1] > 0 and timings["seconds_per_token"] > 0

    assert record["files"] == {"fid_features": "fid_features.safetensors"}
    features = load_file(tmp_path / "cell" / record["files"]["fid_features"])
    generated, real = features["generated"], features["real"]
    assert generated.shape[:2] == (4, 2) and real.shape == (
        inputs.frames.stories * inputs.frames.frames,
        generated.shape[2],
    )
    assert json.loads((tmp_path / "cell" / "metrics.json").read_text()) == record
