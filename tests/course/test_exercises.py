"""The build-it-yourself exercises: labkit's references pass, every common mistake fails with a message that says
what is wrong, the instructor notebooks' solutions pass and the student versions fail each check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.course.checks import ExerciseFailed, failure, run_check
from labkit.course.exercises import EXERCISES, check, exercise
from labkit.course.versions import CHECK_CALL, student_version

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("0[0-8]_*.ipynb"))


def exercise_cells(cells: list[dict]) -> list[tuple[str, str, str]]:
    """(exercise name, solution source, check source) for each nbgrader solution cell and the grade cell after it."""
    pairs = []
    for solution, grade in zip(cells, cells[1:]):
        meta, grade_meta = (
            solution.get("metadata", {}).get("nbgrader", {}),
            grade.get("metadata", {}).get("nbgrader", {}),
        )
        if meta.get("solution") and grade_meta.get("grade"):
            source, check_source = "".join(solution["source"]), "".join(grade["source"])
            pairs.append((CHECK_CALL.search(check_source).group(1), source, check_source))
    return pairs


def run_pair(solution: str, check_source: str) -> None:
    namespace: dict = {}
    exec(compile(solution, "<solution cell>", "exec"), namespace)
    exec(compile(check_source, "<check cell>", "exec"), namespace)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_every_common_mistake_fails_with_its_hint(name):
    item = exercise(name)
    assert item.mistakes, f"{name}: no common mistake, so nothing shows that its check can fail"
    for mistake in item.mistakes:
        message = failure(item, mistake.function)
        assert message is not None, f"{name}: the mistake {mistake.description!r} passes the check"
        assert message.startswith(f"{name}: case ") and "Hint: " + mistake.hint in message, message


@pytest.mark.parametrize("name", sorted(n for n, e in EXERCISES.items() if e.reference is not None))
def test_the_reference_passes_its_own_check(name):
    assert run_check(exercise(name), exercise(name).reference).startswith(f"✓ {name}: all ")


def test_keeping_the_last_tokens_names_the_first_wrong_kept_position():
    def last_tokens(n_entries, sink, window):  # a plausible wrong answer: a window of sink + window tokens
        return list(range(max(0, n_entries - sink - window), n_entries))

    with pytest.raises(ExerciseFailed) as raised:
        check("sink_kept_positions", last_tokens)
    message = str(raised.value)
    assert "case 3 of 7 (n_entries=40, sink=4, window=24)" in message
    assert "the first wrong kept position is item 0: you have 12, the reference has 0" in message
    assert "Hint: that is a window of sink + window tokens" in message


def test_wrong_shape_and_exceptions_are_named():
    assert "shape (2, 16), expected ()" in failure(exercise("cosine_regression_loss"), lambda p, t: (p - t).sum(-1))
    message = failure(exercise("euler_step"), lambda x, eps, s, s2: x + eps[:, :3])
    assert "case 1 of 5 (step 0 of 10" in message and "raised RuntimeError" in message
    assert "not written yet" in failure(
        exercise("verdict_rule"), lambda *a: (_ for _ in ()).throw(NotImplementedError())
    )


def test_a_failed_check_shows_its_message_not_a_traceback():
    error = ExerciseFailed("sink_kept_positions: case 1 of 7 (...): the first wrong kept position is item 0.\nHint: x")
    rendered = error._render_traceback_()
    assert "ExerciseFailed" in rendered[0] and "item 0" in rendered[0] and rendered[1] == "Hint: x"


def test_an_unknown_exercise_is_a_clear_error():
    from labkit.core.errors import ParameterError

    with pytest.raises(ParameterError, match="no exercise 'sink'; the exercises are "):
        exercise("sink")


def test_every_notebook_01_to_08_has_a_checked_exercise_and_every_exercise_a_notebook():
    used = {}
    for path in NOTEBOOKS:
        names = [name for name, _, _ in exercise_cells(json.loads(path.read_text())["cells"])]
        used.update({name: path.name[:2] for name in names})
        if path.name[:2] != "00":
            assert names, f"{path.name}: no build-it-yourself exercise"
    assert used == {name: e.notebook for name, e in EXERCISES.items()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_instructor_solutions_pass_and_student_versions_fail_each_check(path, capsys):
    instructor = exercise_cells(json.loads(path.read_text())["cells"])
    student = exercise_cells(student_version(path)["cells"])
    assert [name for name, _, _ in student] == [name for name, _, _ in instructor]
    for name, solution, check_source in instructor:
        run_pair(solution, check_source)
        assert f"✓ {name}: all " in capsys.readouterr().out
    for name, solution, check_source in student:
        assert "### BEGIN SOLUTION" not in solution and "raise NotImplementedError()" in solution
        with pytest.raises(
            ExerciseFailed, match=rf"^{name}: not written yet\. Replace `raise NotImplementedError\(\)`"
        ):
            run_pair(solution, check_source)
    print(f"{path.stem}: {len(instructor)} checks pass (instructor), {len(student)} fail with their message (student)")
