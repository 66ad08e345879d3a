"""A fresh report reproduces the committed one: exactly on one machine, within MACHINE_TOLERANCE on another."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from labkit.core.paths import project_root
from labkit.experiments.story_ablation import CellConfig, run_cell
from labkit.report.reproduce import MACHINE_TOLERANCE, metric_differences, report_differences

COMMITTED = project_root() / "reports" / "tiny" / "summary.json"


def test_differences_are_listed_with_their_path():
    committed = {"overall": {"fid": 2.0, "clip": 0.5, "sentence_similarity": None}, "per_segment": {"clip": [0.1, 0.2]}}
    fresh = {
        "overall": {"fid": 2.0 + MACHINE_TOLERANCE / 2, "clip": 0.6, "sentence_similarity": 0.3},
        "per_segment": {"clip": [0.1, 0.2]},
    }
    problems = metric_differences(committed, fresh)
    assert len(problems) == 2
    assert (
        problems[0].startswith("overall.clip: 0.5 vs 0.6") and problems[1] == "overall.sentence_similarity: None vs 0.3"
    )
    summary = {"runs": [{"run": "a", "metrics": committed}, {"run": "b", "metrics": committed}]}
    assert report_differences(summary, summary) == []
    assert report_differences(summary, {"runs": summary["runs"][:1]}) == ["b: only in one report"]


@pytest.mark.slow
def test_a_committed_grid_cell_is_reproduced_on_this_machine(tmp_path):
    """Re-run the cheapest cell of the committed report (Table 4's `off` row, about 20 s) and compare it."""
    summary = json.loads(COMMITTED.read_text(encoding="utf-8"))
    cell = next(
        run for run in summary["runs"] if run["run"].endswith("policy=mm-sink-segments=25-adaptation=off-seed=0")
    )
    names = {field.name for field in fields(CellConfig)}
    config = CellConfig(**{key: value for key, value in cell["parameters"].items() if key in names})
    record = run_cell(config, tmp_path / "cell", progress=False)
    problems = metric_differences(cell["metrics"], record["metrics"])
    assert not problems, "\n".join(problems[:20])
