"""The explorers without a browser: their computations, their messages for bad input, and that a control moved
changes what they show (tests/browser drives the same widgets in Chromium)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.models.mllm import llm_config


@pytest.fixture(scope="module")
def rotary():
    from labkit.caches.rope import Rotary

    return Rotary(llm_config(get_preset("tiny"), vocab_size=256))


def test_rope_scores_rerotation_keeps_the_dot_product_and_stale_keys_drift(rotary):
    from labkit.widgets.rope_clock import rope_scores

    query, key = torch.randn(2, 2 * rotary.inv_freq.numel(), generator=torch.Generator().manual_seed(0))
    scores = rope_scores(rotary, query, key, key_position=300, distance=20, shifts=np.arange(0, 301, 25))
    assert np.allclose(scores["rerotated"], scores["true"], atol=1e-4)  # the distance is what it was
    assert scores["stale"][0] == pytest.approx(scores["true"][0], abs=1e-4)  # no shift: nothing is stale yet
    assert np.abs(scores["stale"][1:] - scores["true"][1:]).max() > 0.5  # a shifted query sees another distance


@pytest.mark.parametrize(
    "position, distance, shift, message",
    [(10, 5, 11, "shift: only entries before the key can be evicted: at most 10"), (10, 0, 0, "distance")],
)
def test_rope_scores_refuse_impossible_settings(rotary, position, distance, shift, message):
    from labkit.widgets.rope_clock import rope_scores

    query, key = torch.randn(2, 2 * rotary.inv_freq.numel())
    with pytest.raises(ValueError, match=message):
        rope_scores(rotary, query, key, position, distance, np.array([shift]))


def test_parse_int_names_the_control():
    from labkit.widgets.common import parse_int

    assert parse_int(" 7 ", "seed") == 7
    with pytest.raises(ValueError, match="seed: 'x' is not a whole number"):
        parse_int("x", "seed")
    with pytest.raises(ValueError, match="seed: must be between 0 and 5 \\(got 9\\)"):
        parse_int("9", "seed", 0, 5)


def test_plot_area_shows_a_message_for_bad_input_and_a_figure_otherwise():
    import matplotlib.pyplot as plt

    from labkit.widgets.common import PlotArea

    area = PlotArea()

    def bad():
        raise ValueError("window: must be at least the sink size (4), got 2")

    assert not area.render(bad)
    assert "window: must be at least the sink size" in area.message.value and "Traceback" not in area.message.value
    assert area.render(lambda: plt.figure())
    assert area.message.value == "" and area.seconds.value >= 0


def test_rope_clock_explorer_redraws_when_the_shift_moves_and_reports_a_bad_seed():
    from labkit.widgets import rope_clock_explorer

    explorer = rope_clock_explorer()
    sliders = {child.description: child for row in explorer.children[:2] for child in row.children}
    before = explorer.area.last.axes[1].get_title()
    sliders["shift"].value = 100
    after = explorer.area.last.axes[1].get_title()
    assert before.startswith("shift 64:") and after.startswith("shift 100:")
    sliders["seed"].value = "twelve"
    assert "seed: 'twelve' is not a whole number" in explorer.area.message.value
    assert explorer.area.last is None


def test_kv_cache_explorer_matched_budget_and_a_window_below_the_sink():
    from labkit.widgets.kv_cache import occupancy_figure

    with pytest.raises(ValueError, match="window: must be at least the sink size"):
        occupancy_figure("sink", window=2, sink=4, cap=256, segment=3, budget="training", segments=6)
    with pytest.raises(ValueError, match="segment: must be in 0..5"):
        occupancy_figure("sink", window=64, sink=4, cap=256, segment=6, budget="training", segments=6)
    # matched: the window no longer matters for window and sink (it is set from the cap)
    axis = occupancy_figure("sink", window=2, sink=4, cap=128, segment=5, budget="matched", segments=6)
    assert "'window': 124" in axis.get_title()


def test_ablation_browser_reads_the_committed_report_and_says_when_there_is_none(tmp_path):
    from labkit.widgets.ablation_browser import ablation_browser, load_report, metrics_of, plot_rows, row_record

    summary, records = load_report(project_root() / "reports" / "tiny")
    assert "caption_nll_beyond" in metrics_of(summary, "table2")
    for table, row in (("table2", "sink (matched budget)"), ("table4", "off"), ("stress", "mm-sink")):
        record = row_record(summary, records, table, row)
        assert record is not None, (table, row)
    assert row_record(summary, records, "table2", "sink")["parameters"].get("budget", "training") == "training"
    figure = plot_rows(summary, records, "table2", "fid", ["window", "mm-sink"])
    assert len(figure.axes) == 2
    with pytest.raises(ValueError, match="rows: pick at least one row"):
        plot_rows(summary, records, "table2", "fid", [])
    empty = ablation_browser(tmp_path)
    assert "no report here" in empty.area.message.value
    browser = ablation_browser()
    table, metric = browser.children[0].children
    metric.value = "caption_nll_beyond"
    assert browser.area.last.axes[0].get_xlabel() == "caption_nll_beyond"
    table.value = "stress"
    assert browser.area.last.axes[0].get_title().startswith("stress")


@pytest.fixture(scope="module")
def attention():
    from labkit.widgets.attention import _reference, story_attention

    model, tokenizer, frames, features, window = _reference("tiny")
    return story_attention(model, tokenizer, frames.captions[0][:12], features[0, :12]), window, model, tokenizer


def test_attention_shares_add_up_and_the_window_overlay_holds_the_last_window(attention):
    from labkit.inference.generate import layout_cache_params
    from labkit.widgets.attention import attention_shares, held_positions

    story, window, model, tokenizer = attention
    shares = attention_shares(story, layer=0, head=None, first=10, last=11, window=window)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)  # every query's attention is spread over its keys
    assert shares["BOS"] > 0
    start = int(np.flatnonzero(story.segment_of == 11)[0])  # where segment 12 (0-based 11) starts
    held = held_positions(story, "window", {"window": 100}, upto=11)
    assert np.flatnonzero(held).tolist() == list(range(start - 100, start))
    params = layout_cache_params("mm-sink", {"sink": 4, "window": 100, "cap": 200}, model, tokenizer)
    kept = held_positions(story, "mm-sink", params, upto=11)
    assert kept[:4].all() and kept.sum() <= 200 and kept[start - 100 : start].all()  # sink, window, under the cap


def test_detokenizer_playground_redraws_and_refuses_a_bad_seed():
    from labkit.widgets import detokenizer_playground

    playground = detokenizer_playground()
    first = playground.area.last
    assert [a.get_title() for a in first.axes][1] == "from its true features"
    guidance = playground.children[2].children[0]
    guidance.value = 5.0
    assert playground.area.last is not first
    playground.children[2].children[2].value = "1.5"
    assert "seed: '1.5' is not a whole number" in playground.area.message.value


def test_story_studio_checks_its_settings():
    from labkit.widgets.story_studio import check_settings

    with pytest.raises(ValueError, match="opening: write a first caption"):
        check_settings("  ", "mm-sink", 100, 4, 25, 800)
    with pytest.raises(ValueError, match="window: 900 tokens hold the whole 25-segment story"):
        check_settings("A fox.", "sink", 900, 4, 25, 800)
    with pytest.raises(ValueError, match="segments: must be between 2 and 100"):
        check_settings("A fox.", "dense", 100, 4, 101, 800)
    check_settings("A fox.", "dense", 900, 4, 25, 800)  # dense holds everything: no window to check


def test_story_studio_writes_segment_by_segment_stops_and_scores_the_ground_truth():
    from labkit.widgets import story_studio

    studio = story_studio().studio
    studio.controls["segments"].value = 12
    studio.controls["compare"].value = "window"
    studio.start(blocking=True)
    assert studio.status.value == "done"
    strips = studio.rows.children[1::2]
    assert [len(strip.children) for strip in strips] == [12, 12]  # one card per segment, for both policies
    assert studio.scores.last is not None  # the ground-truth story, teacher-forced under both policies
    studio.controls["segments"].value = 40
    studio.start()
    studio.stop()
    studio.thread.join()
    assert studio.status.value == "stopped" and len(studio.rows.children[1].children) < 40
    studio.controls["opening"].value = ""
    studio.start()
    assert "opening: write a first caption" in studio.status.value


def test_attention_on_captions_alone_has_a_bos_sink_in_layer_0(attention):
    from labkit.widgets.attention import _reference, attention_shares, plain_story_attention

    _, window, model, tokenizer = attention
    frames = _reference("tiny")[2]
    story = plain_story_attention(model.causal_lm, tokenizer, frames.captions[0][:12])
    assert story.types[0] == "bos" and story.segment_of[-1] == 11 and len(story.segment_of) == len(story.types)
    shares = attention_shares(story, layer=0, head=None, first=6, last=11, window=window)
    uniform = 1 / (len(story.types) / 2)  # about what BOS would get from a query halfway through, spread evenly
    assert shares["BOS"] > 5 * uniform  # the committed MLLM keeps a BOS sink in layer 0 (reports/tiny/sink_check)
