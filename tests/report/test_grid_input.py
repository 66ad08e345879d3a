"""A grid's values are checked against the types of its notebooks' defaults before `labkit report` does any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import labkit.report.run as report_run
from labkit.cli.main import main
from labkit.core.errors import LabError
from labkit.core.paths import project_root
from labkit.report.grid import expected_type, load_grid, notebook_defaults

NOTEBOOKS = project_root() / "notebooks"
ABLATION = "07_long_story_ablation.ipynb"


def write_grid(path, axes: str, parameters: str = "{stories: 1}"):
    path.write_text(
        f"blocks:\n  - notebook: {ABLATION}\n    axes: {axes}\n    parameters: {parameters}\n", encoding="utf-8"
    )
    return path


def test_a_string_for_an_int_parameter_is_refused_naming_file_block_parameter_and_type(tmp_path):
    grid = write_grid(tmp_path / "x.yaml", "{policy: [dense], segments: [abc]}")
    with pytest.raises(LabError) as error:
        load_grid(grid)
    assert str(error.value) == (
        f"{grid}: block 1 ({ABLATION}): parameter segments = 'abc' must be an int (the notebook's default is 25)"
    )


@pytest.mark.parametrize(
    "axes, parameters, message",
    [
        ("{segments: [true]}", "{}", "parameter segments = True must be an int"),  # a bool is not an int
        ("{segments: [25]}", "{stories: 1.5}", "parameter stories = 1.5 must be an int"),
        ("{adaptation: [off]}", "{}", "parameter adaptation = False must be a string"),  # YAML's unquoted off
        ("{seed: [0]}", "{teacher_forced: 'no'}", "parameter teacher_forced = 'no' must be a bool"),
        ("{seed: [0]}", "{guidance_scale: high}", "parameter guidance_scale = 'high' must be a number"),
        ("{policy: [dense, [sink]]}", "{}", "parameter policy = ['sink'] must be a string"),
    ],
)
def test_each_mistyped_value_is_named(tmp_path, axes, parameters, message):
    grid = write_grid(tmp_path / "g.yaml", axes, parameters)
    with pytest.raises(LabError, match="block 1") as error:
        load_grid(grid)
    assert str(grid) in str(error.value) and message in str(error.value)


def test_every_mistyped_value_of_every_block_is_reported_at_once(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"blocks:\n  - notebook: {ABLATION}\n    axes: {{seed: [0]}}\n"
        f"  - notebook: {ABLATION}\n    axes: {{segments: [abc, 4, abc]}}\n"
        "    parameters: {stories: two}\n",
        encoding="utf-8",
    )
    with pytest.raises(LabError) as error:
        load_grid(grid)
    lines = str(error.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{grid}: block 2 ({ABLATION}): parameter ") for line in lines)
    assert "segments = 'abc'" in lines[0] and "stories = 'two'" in lines[1]


def test_values_of_the_right_type_pass(tmp_path):
    # a float default takes an int, a None default anything; undeclared names are left to their run (issue 6)
    grid = write_grid(
        tmp_path / "g.yaml",
        "{policy: [dense], segments: [25], adaptation: ['off'], seed: [0, 1]}",
        "{stories: 2, guidance_scale: 2, teacher_forced: false, out_dir: 3, polcy: 1}",
    )
    assert len(load_grid(grid)) == 2


def test_a_notebook_that_does_not_exist_is_left_to_its_run(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("blocks:\n  - notebook: 99_missing.ipynb\n    axes: {segments: [abc]}\n", encoding="utf-8")
    assert [run.notebook for run in load_grid(grid)] == ["99_missing.ipynb"]


@pytest.mark.parametrize(
    "value, default, expected",
    [
        (3, 4, None),
        (True, 4, "an int"),
        (3.0, 4, "an int"),
        ("3", 4, "an int"),
        (3, 2.5, None),
        (3.5, 2.5, None),
        (False, 2.5, "a number (an int or a float)"),
        ("a", "b", None),
        (1, "b", "a string"),
        (True, False, None),
        (1, True, "a bool (true or false)"),
        ("anything", None, None),
        ([1], None, None),
        ([1, 2], [1.0], None),
        ([1, 2], (1, 2), None),
        (1, [1.0], "a list"),
    ],
)
def test_type_rules(value, default, expected):
    assert expected_type(value, default) == expected


def test_defaults_are_read_from_the_parameters_cell_with_ast(tmp_path):
    assert notebook_defaults(NOTEBOOKS / ABLATION)["segments"] == 25
    assert notebook_defaults(NOTEBOOKS / ABLATION)["out_dir"] is None
    assert {k: notebook_defaults(NOTEBOOKS / "05_attention_sinks.ipynb")[k] for k in ("window", "sink", "cap")} == {
        "window": None,
        "sink": 4,
        "cap": 384,
    }  # `window = None` (the training length), `sink, cap = 4, 384`
    cell = {
        "cell_type": "code",
        "metadata": {"tags": ["parameters"]},
        "outputs": [],
        "execution_count": None,
        "source": ["steps: int = -3\n", "scale = 2 * 3.0\n", "names = ['a', 'b']\n", "seed = 0\n", "seed = make()\n"],
    }
    other = {**cell, "metadata": {}, "source": "steps = 'not the parameters cell'\n"}
    notebook = tmp_path / "n.ipynb"
    notebook.write_text(json.dumps({"cells": [other, cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert notebook_defaults(notebook) == {"steps": -3, "names": ["a", "b"]}  # expressions and calls: not typed
    assert notebook_defaults(tmp_path / "missing.ipynb") == {}


def test_the_committed_grids_pass_the_type_check():
    defaults = notebook_defaults(NOTEBOOKS / ABLATION)
    for name in ("tiny.yaml", "tiny-full.yaml"):
        runs = load_grid(project_root() / "grids" / name, NOTEBOOKS)
        assert runs
        for run in runs:  # the check is not vacuous: every grid value has a typed default, and fits it
            assert set(run.parameters) <= set(defaults)
            assert all(expected_type(v, defaults[k]) is None for k, v in run.parameters.items())


# ---- through `labkit report` ------------------------------------------------------------------------------


def test_report_refuses_a_mistyped_grid_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the grid was checked")

    monkeypatch.setattr(report_run, "ensure_dataset", no_work)
    monkeypatch.setattr(report_run, "_execute", no_work)
    grid = write_grid(tmp_path / "x.yaml", "{policy: [dense], segments: [abc]}")
    out = tmp_path / "report"
    (out / "runs" / "an-earlier-cell").mkdir(parents=True)  # a bad grid must not prune an earlier report either
    start = time.perf_counter()
    code = main(["report", "--grid", str(grid), "--out", str(out), "--grid-only", "--quiet"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and seconds < 3
    assert str(grid) in err and "segments = 'abc' must be an int" in err and "Traceback" not in err
    assert [p.name for p in out.rglob("*")] == ["runs", "an-earlier-cell"]


@pytest.mark.slow  # a fresh interpreter imports torch
def test_console_script_exits_2_on_a_mistyped_grid_without_traceback_or_output(tmp_path):
    grid = write_grid(tmp_path / "x.yaml", "{policy: [dense], segments: [abc]}")
    out = tmp_path / "report"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "labkit.cli.main", "report", "--grid", str(grid), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert str(grid) in result.stderr and "segments" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    # what remains is importing labkit.report.run (torch, transformers); the grid used to fail inside the notebook
    assert seconds < 120
