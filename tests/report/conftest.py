"""The grid report that test_report.py's failure test and test_dask_executor.py's dask test both read: notebook
07's four smallest policy cells plus three that fail, run once per session through `labkit report` as a user types
it, on the default executor (spawned processes, two notebooks at a time), the one the dask executor must match."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit.cli.main import main
from labkit.core.paths import project_root

SAMPLE = project_root() / "data_samples" / "storystream-mini"
CELL = "07_long_story_ablation-policy={}"
POLICIES = ["dense", "window", "sink", "mm-sink"]
# the smallest cells notebook 07 runs (one story, 3 segments, 2 Euler steps): a kernel's start dominates
TINY_CELLS = "parameters: {segments: 3, stories: 1, sample_steps: 2, adaptation: full, seeds: 1}"
# three runs that fail, each its own way: a policy notebook 07 refuses, a notebook that does not exist, a parameter
# the notebook does not declare
FAILING = "  - notebook: 99_missing.ipynb\n  - notebook: 07_long_story_ablation.ipynb\n    axes: {polcy: [dense]}\n"


def grid_file(path: Path, policies: list[str], failing: bool = False) -> Path:
    """A grid of notebook 07's TINY_CELLS over `policies` (then `nosuch` and FAILING when `failing`)."""
    axis = ", ".join(policies + (["nosuch"] if failing else []))
    text = f"blocks:\n  - notebook: 07_long_story_ablation.ipynb\n    axes: {{policy: [{axis}]}}\n    {TINY_CELLS}\n"
    path.write_text(text + (FAILING if failing else ""), encoding="utf-8")
    return path


@dataclass
class SequentialReport:
    grid: Path  # the grid file: POLICIES and the failing runs
    out: Path  # the report folder
    code: int  # `labkit report`'s exit code
    stderr: str
    summary: dict  # summary.json as the run left it

    def runs(self) -> dict[str, dict]:
        return {r["run"]: r for r in self.summary["runs"]}


@pytest.fixture(scope="session")
def sequential_report(tmp_path_factory) -> SequentialReport:
    """`labkit report --grid G --grid-only --quiet` on the committed sample data (about a minute)."""
    folder = tmp_path_factory.mktemp("sequential")
    grid, out = grid_file(folder / "grid.yaml", POLICIES, failing=True), folder / "report"
    command = ["report", "--grid", str(grid), "--out", str(out), "--grid-only", "--data", str(SAMPLE)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([*command, "--quiet"])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return SequentialReport(grid, out, code, stderr.getvalue(), summary)
