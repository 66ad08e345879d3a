"""The ablation grid of `labkit report`: which notebooks run, with which parameters (issue 6).

A grid file is YAML with one key, `blocks`: each block names a notebook, `axes` whose product gives one run per
combination, and fixed `parameters` given to every run of the block::

    blocks:
      - notebook: 07_long_story_ablation.ipynb
        axes: {policy: [dense, mm-sink], segments: [25], adaptation: [off, full], seed: [0]}
        parameters: {stories: 4}

The lab's default grid is `grids/<preset>.yaml`. A malformed file is refused before any work (file and key
named); a run whose parameters its notebook does not declare fails on its own and the other runs go on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LabError

BLOCK_KEYS = {"notebook", "axes", "parameters", "title"}


@dataclass
class GridRun:
    """One papermill execution: a notebook and its parameters; `run_id` names its output folder."""

    notebook: str
    parameters: dict
    title: str
    run_id: str = ""
    axes: dict = field(default_factory=dict)  # the axis values of this run (part of `parameters`)

    def __post_init__(self) -> None:
        if not self.run_id:
            stem = self.notebook.removesuffix(".ipynb")
            self.run_id = stem + "".join(f"-{k}={v}" for k, v in self.axes.items()) if self.axes else stem

    def digest(self) -> str:
        """Identifies the parameters, so a finished run is reused only when nothing changed."""
        return hashlib.sha256(json.dumps([self.notebook, self.parameters], sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_grid(preset: str) -> Path:
    from .report import project_root

    return project_root() / "grids" / f"{preset}.yaml"


def load_grid(path: Path | str) -> list[GridRun]:
    """Expand a grid file into runs, in file order; raise LabError naming the file and the bad key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LabError(f"{path}: grid file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise LabError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict) or set(data) != {"blocks"} or not isinstance(data["blocks"], list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise LabError(f"{path}: a grid has exactly one top-level key, `blocks` (a list); found {keys}")
    runs: list[GridRun] = []
    for number, block in enumerate(data["blocks"], start=1):
        runs += _expand(path, number, block)
    seen: set[str] = set()
    for run in runs:
        if run.run_id in seen:
            raise LabError(f"{path}: two runs would both be {run.run_id!r}; make the blocks' axes differ")
        seen.add(run.run_id)
    return runs


def _expand(path: Path, number: int, block) -> list[GridRun]:
    where = f"{path}: block {number}"
    if not isinstance(block, dict):
        raise LabError(f"{where}: must be a mapping with keys {sorted(BLOCK_KEYS)}")
    unknown = set(block) - BLOCK_KEYS
    if unknown:
        raise LabError(f"{where}: unknown key(s) {sorted(unknown)}; a block has {sorted(BLOCK_KEYS)}")
    notebook = block.get("notebook")
    if not isinstance(notebook, str) or not notebook.endswith(".ipynb"):
        raise LabError(f"{where}: `notebook` must name an .ipynb file (got {notebook!r})")
    axes = block.get("axes") or {}
    fixed = block.get("parameters") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise LabError(f"{where}: `axes` must map each parameter to a non-empty list of values")
    if not isinstance(fixed, dict):
        raise LabError(f"{where}: `parameters` must be a mapping")
    both = set(axes) & set(fixed)
    if both:
        raise LabError(f"{where}: {sorted(both)} appear both as axes and as fixed parameters")
    title = str(block.get("title", notebook))
    names = list(axes)
    return [GridRun(notebook, {**fixed, **dict(zip(names, values))}, title, axes=dict(zip(names, values)))
            for values in itertools.product(*(axes[n] for n in names))]


def undeclared_parameters(notebook: Path, parameters: dict) -> list[str]:
    """Parameters a run passes that the notebook's `parameters` cell does not define (papermill would only warn)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return sorted(set(parameters) - set(declared))
