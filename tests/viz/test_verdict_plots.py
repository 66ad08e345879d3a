"""One cell's units and the findings' forest plot (labkit.viz.verdicts), on small hand-made records."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.colors import to_hex

from labkit.viz.verdicts import VERDICT_COLOURS, absolute_noise, plot_findings, plot_units, rows_markdown, unit_rows

RECORD = {
    "metrics": {
        "units": {"seed": [0, 0, 1], "story": [0, 1, 2], "clip": [0.5, 0.6, 0.4], "char_acc": [0.2, 1.0, 0.5]},
        "teacher_forced": {
            "per_story": {"story": [2, 0, 1], "caption_nll": [0.3, 0.4, 0.5], "caption_nll_beyond": [math.nan] * 3}
        },
    }
}


def _finding(metric: str, difference: float, ci95, verdict: str, claim: str = "A claim.") -> dict:
    return {"claim": claim, "metric": metric, "difference": difference, "ci95": ci95, "n": 9, "verdict": verdict}


def test_unit_rows_join_each_unit_to_its_story_teacher_forced_scores():
    rows = unit_rows(RECORD)
    assert [(r["seed"], r["story"], r["clip"]) for r in rows] == [(0, 0, 0.5), (0, 1, 0.6), (1, 2, 0.4)]
    assert [r["caption_nll"] for r in rows] == [0.4, 0.5, 0.3]
    bare = unit_rows({"metrics": {"units": RECORD["metrics"]["units"], "teacher_forced": None}})
    assert list(bare[0]) == ["seed", "story", "clip", "char_acc"]


def test_rows_markdown_shows_missing_values_as_na():
    table = rows_markdown(unit_rows(RECORD), digits=2).splitlines()
    assert table[0] == "| seed | story | clip | char_acc | caption_nll | caption_nll_beyond |"
    assert table[2] == "| 0 | 0 | 0.50 | 0.20 | 0.40 | n/a |"
    assert rows_markdown([]) == "_(no rows)_"


def test_plot_units_draws_one_strip_per_metric_with_a_value():
    figure = plot_units(unit_rows(RECORD))  # caption_nll_beyond has no value: no strip
    assert [axis.get_title() for axis in figure.axes] == [
        "CLIP-analogue",
        "character accuracy",
        "teacher-forced caption\nNLL",
    ]
    assert [len(axis.collections[0].get_offsets()) for axis in figure.axes] == [3, 3, 3]
    plt.close(figure)


def test_absolute_noise_leaves_out_the_relative_fid_change():
    assert absolute_noise({"largest_change": {"fid": 2.5, "char_acc": 0.2}}) == {"char_acc": 0.2}
    assert absolute_noise(None) == {}


def test_plot_findings_one_panel_per_metric_coloured_by_verdict():
    findings = [
        _finding("caption_nll_beyond", 0.29, [0.25, 0.33], "reproduced", "Sink beats window."),
        _finding("char_acc", -0.05, [None, None], "inconclusive"),
        _finding("caption_nll_beyond", -0.01, [-0.03, -0.001], "contradicted", "Sink beats mm-sink."),
    ]
    figure = plot_findings(findings, noise={"char_acc": 0.2})
    nll, char = figure.axes
    assert [t.get_text() for t in nll.get_yticklabels()] == ["3. Sink beats mm-sink.", "1. Sink beats window."]
    assert [to_hex(c.get_colors()[0]) for c in nll.collections[:2]] == [
        VERDICT_COLOURS["contradicted"],
        VERDICT_COLOURS["reproduced"],
    ]
    point = char.get_lines()[0]
    assert point.get_markerfacecolor() == "white"  # no interval: a hollow dot, no bar
    assert len(char.collections) == 0 and len(char.patches) == 1  # the retraining band
    plt.close(figure)
