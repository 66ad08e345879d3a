"""How long each notebook and each of its cells took in the last report: read from the report's summary.json.

`labkit report` runs the notebooks with papermill, which stamps every notebook and cell with its duration; the report
keeps each run's seconds and its code cells' seconds in `reports/<preset>/summary.json` (committed, unlike the
executed notebooks). Runtime lines and tables are made from there, never typed: a notebook's opening cell calls
`runtime_line`, the course guide's tables come from `measured_runs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from labkit.core.paths import project_root
from labkit.report.grid import notebook_defaults

LIVE_CELL_SECONDS = 2.0  # a cell that takes longer is a "live" cell worth timing in the instructor notes
# folders of the machine that ran the report, and 08's digest of the cells: not settings a user changes
MACHINE_PARAMETERS = {"data_dir", "report_dir", "out_dir", "cells"}


@dataclass(frozen=True)
class MeasuredRun:
    """One executed notebook of a report: what ran, with which parameters, how long it took."""

    notebook: str  # stem, e.g. "05_attention_sinks"
    run: str  # the report's run id
    seconds: float
    defaults_differ: dict  # parameter -> (the report's value, the notebook's default)
    cells: list  # [cell index in the executed notebook, seconds, its first line that is not an import]


def _summary(preset: str) -> dict:
    path = project_root() / "reports" / preset / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def measured_runs(preset: str = "tiny") -> dict[str, MeasuredRun]:
    """Each notebook's run in the last report; for a notebook run several times (07's grid), the run whose
    parameters are closest to the notebook's defaults."""
    runs: dict[str, MeasuredRun] = {}
    for entry in _summary(preset).get("runs", []):
        source = project_root() / "notebooks" / entry["notebook"]
        if entry.get("status") == "failed" or not source.is_file():
            continue
        defaults = notebook_defaults(source)
        differ = {
            k: (v, defaults.get(k))
            for k, v in entry["parameters"].items()
            if k not in MACHINE_PARAMETERS and defaults.get(k) != v
        }
        run = MeasuredRun(source.stem, entry["run"], float(entry["seconds"]), differ, entry.get("cell_seconds", []))
        if source.stem not in runs or len(differ) < len(runs[source.stem].defaults_differ):
            runs[source.stem] = run
    return runs


def cell_label(notebook: str, executed_index: int) -> str:
    """'12: `curves = long_context_curves(...)`': a report cell by its index in notebooks/ and its first line that does
    something. Papermill adds one cell (the injected parameters) after the `parameters` cell of every report run."""
    cells = json.loads((project_root() / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    index = executed_index - 1 if tagged and executed_index > tagged[0] else executed_index
    if not 0 <= index < len(cells):
        return f"{index}: (no such cell in notebooks/ now)"
    lines = [line.strip() for line in "".join(cells[index]["source"]).splitlines() if line.strip()]
    skip = ("import ", "from ", "#", "runtime_line(")
    first = next((line for line in lines if not line.startswith(skip)), lines[0] if lines else "")
    return f"{index}: `{first[:70]}`"


def machine(preset: str = "tiny") -> str:
    """'a 2-core AMD EPYC, 1 thread per notebook': where the last report ran."""
    info = _summary(preset).get("machine", {})
    threads = info.get("notebook_threads")
    return f"a {info.get('cores', '?')}-core {info.get('cpu', 'CPU')}" + (
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
        how = (
            " with these default parameters"
            if not run.defaults_differ
            else "; the report ran it with "
            + ", ".join(f"{k}={v!r} (default {d!r})" for k, (v, d) in run.defaults_differ.items())
        )
        line = (
            f"Runtime: {format_seconds(run.seconds)} in the last report (reports/{preset}/, on {machine(preset)}){how}."
        )
    print(line)
    return line
