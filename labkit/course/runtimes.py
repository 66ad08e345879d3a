"""How long each notebook and each of its cells took in the last report, read from the executed notebooks.

`labkit report` runs the notebooks with papermill, which stamps every executed notebook with its duration and
every cell with its own (`metadata.papermill.duration`). Runtime lines and tables are made from those stamps,
never typed: a notebook's opening cell calls `runtime_line`, the course guide's tables come from `notebook_runtimes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from labkit.core.paths import project_root
from labkit.report.grid import notebook_defaults

LIVE_CELL_SECONDS = 2.0  # a cell that takes longer is a "live" cell worth timing in the instructor notes


@dataclass(frozen=True)
class MeasuredRun:
    """One executed notebook of a report: what ran, with which parameters, how long it took."""

    notebook: str  # stem, e.g. "05_attention_sinks"
    path: Path
    seconds: float
    end_time: str
    parameters: dict
    defaults_differ: dict  # parameter -> (the report's value, the notebook's default), data paths left out
    cells: list[tuple[str, float]]  # (first line of each code cell, seconds)


def _report_folder(preset: str) -> Path:
    return project_root() / "reports" / preset


def _differences(parameters: dict, defaults: dict) -> dict:
    # data_dir / report_dir / out_dir name folders of the machine that ran the report: not a setting a user changes
    skip = {"data_dir", "report_dir", "out_dir", "cells"}
    return {k: (v, defaults.get(k)) for k, v in parameters.items() if k not in skip and defaults.get(k) != v}


def measured_runs(preset: str = "tiny", notebooks: Path | None = None) -> dict[str, MeasuredRun]:
    """Each notebook's executed run in the last report; for a notebook run several times (07's grid), the run whose
    parameters are closest to the notebook's defaults."""
    notebooks = notebooks or project_root() / "notebooks"
    runs: dict[str, MeasuredRun] = {}
    for path in sorted((_report_folder(preset) / "executed").glob("*.ipynb")):
        data = json.loads(path.read_text(encoding="utf-8"))
        papermill = data.get("metadata", {}).get("papermill", {})
        stem = path.stem.split("-", 1)[0]
        source = notebooks / f"{stem}.ipynb"
        if "duration" not in papermill or not source.is_file():
            continue
        cells = [
            (
                "".join(c["source"]).strip().splitlines()[0] if "".join(c["source"]).strip() else "",
                float(c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0),
            )
            for c in data["cells"]
            if c["cell_type"] == "code"
        ]
        run = MeasuredRun(
            stem,
            path,
            float(papermill["duration"]),
            str(papermill.get("end_time", ""))[:10],
            dict(papermill.get("parameters", {})),
            _differences(papermill.get("parameters", {}), notebook_defaults(source)),
            cells,
        )
        if stem not in runs or len(run.defaults_differ) < len(runs[stem].defaults_differ):
            runs[stem] = run
    return runs


def _machine(preset: str) -> str:
    summary = _report_folder(preset) / "summary.json"
    if not summary.is_file():
        return "this machine"
    machine = json.loads(summary.read_text(encoding="utf-8")).get("machine", {})
    threads = machine.get("notebook_threads")
    return f"a {machine.get('cores', '?')}-core {machine.get('cpu', 'CPU')}" + (
        f", {threads} thread{'s' if threads != 1 else ''} per notebook" if threads else ""
    )


def format_seconds(seconds: float) -> str:
    """'14 s', '1.5 min': how long something took, to the precision a reader needs."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def runtime_line(notebook: str, preset: str = "tiny") -> str:
    """The runtime of `notebook` ("05_attention_sinks") in the last report, as one printed line."""
    run = measured_runs(preset).get(notebook)
    if run is None:
        line = f"Runtime: not measured yet (run `make report`: it times every notebook into reports/{preset}/)."
    else:
        changed = (
            "; the report ran it with "
            + ", ".join(f"{k}={v!r} (default {d!r})" for k, (v, d) in run.defaults_differ.items())
            if run.defaults_differ
            else " with these default parameters"
        )
        line = (
            f"Runtime: {format_seconds(run.seconds)} in the last report (reports/{preset}/, {run.end_time}, on "
            f"{_machine(preset)}){changed}."
        )
    print(line)
    return line
