"""Claims, measured runtimes, the generated course files and `labkit course build`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit.cli.main import main
from labkit.core.errors import LabError
from labkit.course import versions
from labkit.course.claims import ClaimChanged, claim, claim_order
from labkit.course.runtimes import measured_runs, runtime_line

ROOT = Path(__file__).resolve().parents[2]


def test_a_claim_holds_to_the_quoted_digits_and_names_the_new_value_when_it_does_not():
    assert claim("window NLL", "3.41", 3.4149).startswith("✓ window NLL: 3.41 as the text says")
    claim("character accuracy", "46", 0.4583, percent=True)
    with pytest.raises(ClaimChanged, match=r"the text says window NLL is 3.41, the computed value is now 3.4160"):
        claim("window NLL", "3.41", 3.416)
    with pytest.raises(ClaimChanged, match=r"is 46%, the computed value is now 58\.33%"):
        claim("character accuracy", "46", 0.5833, percent=True)
    claim("a coarse ratio", "1.5", 1.58, within=0.1)
    with pytest.raises(LabError, match="must be a plain number"):
        claim("bad", "about 3", 3.0)


def test_an_ordering_claim_names_the_pair_that_no_longer_holds():
    assert "✓" in claim_order("NLL", {"sink": 1.67, "dense": 2.73, "window": 3.41}, "sink < dense < window")
    with pytest.raises(ClaimChanged, match=r"dense < window no longer holds \(sink 1.67, dense 3.5, window 3.41\)"):
        claim_order("NLL", {"sink": 1.67, "dense": 3.5, "window": 3.41}, "sink < dense < window")
    with pytest.raises(LabError, match="names"):
        claim_order("NLL", {"sink": 1.0}, "sink < mm-sink")


def test_runtime_lines_come_from_the_report_summary():
    runs = measured_runs("tiny")
    assert {"00_quickstart", "05_attention_sinks", "07_long_story_ablation", "08_report"} <= set(runs)
    line = runtime_line("05_attention_sinks")
    assert line.startswith("Runtime: ") and "in the last report (reports/tiny/" in line
    assert f"{runs['05_attention_sinks'].seconds:.0f} s" in line
    assert "not measured yet" in runtime_line("99_missing")


@pytest.fixture(scope="module")
def generated() -> dict:
    """What `labkit course build` writes (about 17 s on 2 cores: made once for the tests below)."""
    return versions.build()


def test_the_generated_course_files_are_up_to_date(generated):
    stale = [
        str(p.relative_to(ROOT))
        for p, text in generated.items()
        if not p.is_file() or p.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"run `labkit course build`: {stale} differ from what the notebooks and report give"


def test_course_build_check_exits_2_naming_the_stale_file(generated, monkeypatch, capsys):
    target = next(p for p in generated if p.name == "answer_key.md")
    monkeypatch.setattr(versions, "build", lambda preset="tiny": {**generated, target: generated[target] + "changed\n"})
    assert main(["course", "build", "--check"]) == 2
    assert "out of date (run `labkit course build`): docs/course/answer_key.md" in capsys.readouterr().err


def test_student_notebooks_keep_everything_but_the_solutions():
    for path in sorted((ROOT / "notebooks").glob("0[1-8]_*.ipynb")):
        source, student = json.loads(path.read_text()), versions.student_version(path)
        assert len(student.cells) == len(source["cells"]), path.name
        changed = [
            i for i, (a, b) in enumerate(zip(source["cells"], student.cells)) if "".join(a["source"]) != b.source
        ]
        solutions = [i for i, c in enumerate(source["cells"]) if c["metadata"].get("nbgrader", {}).get("solution")]
        assert changed == solutions, f"{path.name}: cells {changed} changed, the solution cells are {solutions}"


@pytest.mark.slow
def test_a_student_failing_check_shows_its_message_in_a_real_kernel(tmp_path):
    """The student version of notebook 05's first exercise, run in a Jupyter kernel: the error output is the check's
    message (ExerciseFailed renders without a traceback), and a wrong answer names the first wrong kept position."""
    student = versions.student_version(ROOT / "notebooks" / "05_attention_sinks.ipynb")
    start = next(i for i, c in enumerate(student.cells) if "def sink_kept_positions" in c.source)
    wrong = nbformat.v4.new_code_cell(
        "def sink_kept_positions(n_entries, sink, window):\n"
        "    return list(range(max(0, n_entries - sink - window), n_entries))"
    )
    notebook = nbformat.v4.new_notebook(
        cells=[student.cells[start], student.cells[start + 1], wrong, copy.deepcopy(student.cells[start + 1])]
    )
    notebook.metadata = student.metadata
    NotebookClient(
        notebook, timeout=120, allow_errors=True, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 2
    first, second = ("\n".join(e.traceback) for e in errors)
    assert "sink_kept_positions: not written yet" in first and "Traceback" not in first and ".py" not in first
    assert "the first wrong kept position is item 0: you have 12, the reference has 0" in second


def test_course_build_from_the_command_line_says_what_it_did(generated, monkeypatch, capsys):
    monkeypatch.setattr(versions, "build", lambda preset="tiny": generated)
    assert main(["course", "build", "--check"]) == 0
    assert "generated files up to date" in capsys.readouterr().out


def test_at_another_preset_a_claim_that_does_not_hold_is_reported_not_raised(monkeypatch, capsys):
    from labkit.course.claims import PRESET_ENV

    monkeypatch.setenv(PRESET_ENV, "small")  # `labkit report --preset small` sets it for its kernels
    line = claim("window NLL", "3.41", 2.0)
    assert "at the small preset (the text quotes tiny)" in line and "the computed value is now 2.0000" in line
    assert "at the small preset" in claim_order("NLL", {"sink": 2.0, "dense": 1.0}, "sink < dense")
    monkeypatch.setenv(PRESET_ENV, "tiny")
    with pytest.raises(ClaimChanged):
        claim("window NLL", "3.41", 2.0)
