"""The BOS-sink plots of notebooks 04 and 05 (labkit.viz.sink_layers), on small hand-made manifests and checks."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from labkit.viz.sink_layers import (
    layers_with_sink,
    manifest_panels,
    plot_bos_layers,
    plot_sink_check_nll,
    read_sink_check,
    sink_check_panels,
    sink_check_ratios,
)


def _block(mean: list[float]) -> dict:
    return {"mean_over_heads": mean, "strongest_head": [2 * r for r in mean]}


LM = {"bos_ratio": {"skip": 32, "captions": _block([20.0, 1.0, 8.0]), "backcopy": _block([30.0, 0.9, 5.0])}}
MLLM = {
    "bos_ratio": {
        "skip": 32,
        "captions_before_stage2": _block([20.0, 1.0, 8.0]),
        "captions_after_stage2": _block([18.0, 0.5, 0.6]),
        "multimodal_after_stage2": _block([12.0, 0.7, 0.5]),
    }
}


def _check(window_beyond: float = 0.8, sink_beyond: float = 0.5, within: float = 0.4) -> dict:
    forced = {
        policy: {"params": {}, "nll_within": within, "nll_beyond": beyond, "per_story_beyond": [beyond, beyond]}
        for policy, beyond in (("dense", 0.7), ("window", window_beyond), ("sink", sink_beyond), ("mm-sink", 0.5))
    }
    return {
        "stories": 2,
        "segments": 25,
        "window_tokens": 300,
        "bos_multimodal": _block([17.0, 0.8, 1.1]),
        "bos_plain_captions": _block([23.0, 0.5, 0.6]),
        "teacher_forced": forced,
        "window_over_sink_beyond": window_beyond / sink_beyond,
        "sink_beyond_over_within": sink_beyond / within,
        "mm_sink_beyond_over_within": 0.5 / within,
    }


def test_manifest_panels_read_each_probe_and_skip_a_missing_manifest():
    panels = manifest_panels(LM, MLLM)
    assert list(panels) == ["pre-trained LM (lm manifest)", "MLLM (mllm manifest)"]
    assert panels["pre-trained LM (lm manifest)"]["story captions"] == [20.0, 1.0, 8.0]
    assert list(panels["MLLM (mllm manifest)"]) == [
        "captions, before stage 2",
        "captions, after stage 2",
        "multimodal, after stage 2",
    ]
    assert manifest_panels(LM, MLLM, "strongest_head")["MLLM (mllm manifest)"]["captions, after stage 2"][0] == 36.0
    assert list(manifest_panels(None, MLLM)) == ["MLLM (mllm manifest)"]
    assert manifest_panels({"stage": "lm"}, None) == {}


def test_layers_with_sink_counts_layers_at_or_above_the_level():
    assert layers_with_sink([24.7, 1.0, 5.0, 4.99], 5.0) == [0, 2]


def test_plot_bos_layers_draws_one_bar_per_layer_and_probe_on_a_log_scale():
    figure = plot_bos_layers(manifest_panels(LM, MLLM), sink_level=5.0)
    left, right = figure.axes
    assert len(left.patches) == 2 * 3 and len(right.patches) == 3 * 3
    assert left.get_yscale() == "log"
    assert sorted(line.get_ydata()[0] for line in right.get_lines()) == [1, 5.0]  # uniform and the sink level
    plt.close(figure)


def test_read_sink_check_returns_none_without_the_file(tmp_path):
    assert read_sink_check(tmp_path / "sink_check.json") is None
    (tmp_path / "sink_check.json").write_text(json.dumps(_check()))
    evidence = read_sink_check(tmp_path / "sink_check.json")
    assert sink_check_panels(evidence)["2 test stories (labkit sink-check)"]["multimodal stories"][0] == 17.0


@pytest.mark.parametrize(("window_beyond", "window_met"), [(0.8, True), (0.7, False)])
def test_sink_check_ratios_apply_each_target_in_its_direction(window_beyond, window_met):
    rows = sink_check_ratios(_check(window_beyond=window_beyond), window_target=1.5, flat_target=1.15)
    assert [row["met"] for row in rows] == [window_met, False, False]  # 0.5 / 0.4 = 1.25 > 1.15: not flat
    assert rows[0]["value"] == pytest.approx(window_beyond / 0.5)
    flat = sink_check_ratios(_check(sink_beyond=0.44, within=0.4), window_target=1.5, flat_target=1.15)
    assert flat[1]["met"] and flat[1]["rule"] == "<="


def test_plot_sink_check_nll_draws_policies_and_target_lines():
    figure = plot_sink_check_nll(_check(), window_target=1.5, flat_target=1.15)
    left, right = figure.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["dense", "window", "sink", "mm-sink"]
    assert len(left.patches) == 8  # within and beyond per policy
    targets = [segments[0][0][1] for segments in (c.get_segments() for c in right.collections)]
    assert targets == [1.5, 1.15, 1.15]
    plt.close(figure)
