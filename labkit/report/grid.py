"""The ablation grid of `labkit report`: which notebooks run, with which parameters (issue 6).

A grid file is YAML with one key, `blocks`: each block names a notebook, `axes` whose product gives one run per
combination, and fixed `parameters` given to every run of the block::

    blocks:
      - notebook: 07_long_story_ablation.ipynb
        axes: {policy: [dense, mm-sink], segments: [25], adaptation: [off, full], seed: [0]}
        parameters: {stories: 4}

The lab's default grid is `grids/<preset>.yaml`. A malformed file is refused before any work (file and key
named), and so is a value whose type does not match the default in its notebook's `parameters` cell (`segments:
[abc]` where the notebook says `segments = 4`); a run whose parameters its notebook does not declare fails on its
own and the other runs go on.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from labkit.core.errors import LabError
from labkit.core.paths import project_root

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
        text = json.dumps([self.notebook, self.parameters], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_grid(preset: str) -> Path:
    return project_root() / "grids" / f"{preset}.yaml"


def load_grid(path: Path | str, notebooks: Path | str | None = None) -> list[GridRun]:
    """Expand a grid file into runs, in file order; raise LabError naming the file and the bad key or value.

    Every value is checked against the type of its default in the notebook's `parameters` cell (notebooks are
    looked up in `notebooks`, default the project's `notebooks/`), so a mistyped value stops here, before any
    notebook runs, instead of failing inside it."""
    import yaml

    path = Path(path)
    folder = Path(notebooks) if notebooks is not None else project_root() / "notebooks"
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
    mistyped: list[str] = []
    defaults: dict[str, dict] = {}  # notebook name -> its parameters' defaults, read once
    for number, block in enumerate(data["blocks"], start=1):
        runs += _expand(path, number, block)
        notebook = block["notebook"]
        if notebook not in defaults:
            defaults[notebook] = notebook_defaults(folder / notebook)
        mistyped += _mistyped(f"{path}: block {number} ({notebook})", block, defaults[notebook])
    if mistyped:
        raise LabError("\n".join(dict.fromkeys(mistyped)))  # each problem once, in file order
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
    return [
        GridRun(notebook, {**fixed, **dict(zip(names, values))}, title, axes=dict(zip(names, values)))
        for values in itertools.product(*(axes[n] for n in names))
    ]


def undeclared_parameters(notebook: Path, parameters: dict) -> list[str]:
    """Parameters a run passes that the notebook's `parameters` cell does not define (papermill would only warn)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return sorted(set(parameters) - set(declared))


def notebook_defaults(notebook: Path | str) -> dict[str, object]:
    """The literal defaults of a notebook's `parameters` cell (the cell tagged "parameters"), by name.

    The cell is parsed with `ast`: `name = literal`, `name: type = literal` and `a, b = 1, 2` count; a name whose
    value is not a literal (an expression, a call) is left out, and so is everything of a notebook that is missing,
    unreadable or has no such cell (its runs fail on their own, as before)."""
    try:
        cells = json.loads(Path(notebook).read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return {}
    for cell in cells:
        if "parameters" not in (cell.get("metadata") or {}).get("tags", []):
            continue
        source = cell.get("source", "")
        try:
            tree = ast.parse("".join(source) if isinstance(source, list) else source)
        except SyntaxError:  # IPython magics, say: papermill copes, we cannot tell the types
            return {}
        defaults: dict[str, object] = {}
        for statement in tree.body:
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    _bind(target, statement.value, defaults)
            elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
                _bind(statement.target, statement.value, defaults)
        return defaults
    return {}


_NOT_LITERAL = object()


def _literal(node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _bind(target: ast.expr, value: ast.expr, defaults: dict[str, object]) -> None:
    """Record `target = value` when the value is a literal (element by element for `a, b = 1, 2`)."""
    if isinstance(target, ast.Name):
        literal = _literal(value)
        if literal is not _NOT_LITERAL:
            defaults[target.id] = literal
        else:
            defaults.pop(target.id, None)  # reassigned to something we cannot type: no check
    elif isinstance(target, (ast.Tuple, ast.List)):
        pairs = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts)
        values = value.elts if pairs else None
        for index, element in enumerate(target.elts):
            if values is not None:
                _bind(element, values[index], defaults)
            elif isinstance(element, ast.Name):
                defaults.pop(element.id, None)


def expected_type(value: object, default: object) -> str | None:
    """None if `value` may replace `default` in a notebook, else the type it must have ("an int").

    An int default takes an int (not a bool); a float, an int or a float; a str, a str; a bool, a bool; a list or
    tuple, a list; a None default takes anything."""
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "a bool (true or false)"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
    if isinstance(default, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number else "a number (an int or a float)"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    return None if isinstance(value, type(default)) else f"a {type(default).__name__}"


def _mistyped(where: str, block: dict, defaults: dict[str, object]) -> list[str]:
    """A block's values (each value of each axis, and the fixed parameters) whose type does not fit the defaults."""
    values = [(name, value) for name, options in (block.get("axes") or {}).items() for value in options]
    values += list((block.get("parameters") or {}).items())
    problems = []
    for name, value in values:
        if name not in defaults:  # undeclared (reported by its run) or not a literal default
            continue
        expected = expected_type(value, defaults[name])
        if expected is None:
            continue
        hint = (
            " (YAML reads unquoted off/on/yes/no as true/false: put the word in quotes)"
            if isinstance(value, bool) and isinstance(defaults[name], str)
            else ""
        )
        problems.append(
            f"{where}: parameter {name} = {value!r} must be {expected} "
            f"(the notebook's default is {defaults[name]!r}){hint}"
        )
    return problems
