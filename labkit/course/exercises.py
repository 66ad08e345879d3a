"""Every build-it-yourself exercise of the course, and `check`, the one call a notebook's check cell makes.

In a notebook (instructor version: the solution is written out; student version: `labkit course build` has replaced
it with `raise NotImplementedError()`)::

    def sink_kept_positions(n_entries, sink, window):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

    check("sink_kept_positions", sink_kept_positions)   # a locked nbgrader grade cell

A pass prints one line; a failure raises `ExerciseFailed` whose message names the case and what is wrong.
"""

from __future__ import annotations

from typing import Callable

from labkit.core.errors import ParameterError
from labkit.course.checks import Exercise, run_check
from labkit.course.exercises_sinks import SINK_EXERCISES
from labkit.course.exercises_stages import STAGE_EXERCISES
from labkit.course.exercises_statistics import STATISTICS_EXERCISES

EXERCISES: dict[str, Exercise] = {e.name: e for e in (*STAGE_EXERCISES, *SINK_EXERCISES, *STATISTICS_EXERCISES)}


def exercise(name: str) -> Exercise:
    """The exercise called `name`; a clear error naming the known ones otherwise."""
    if name not in EXERCISES:
        raise ParameterError("name", f"no exercise {name!r}; the exercises are {', '.join(sorted(EXERCISES))}")
    return EXERCISES[name]


def check(name: str, function: Callable) -> None:
    """Run exercise `name`'s hidden cases on `function`: print one line when all agree, raise `ExerciseFailed`
    (a message naming the first wrong case, position or value, and the hint of a known mistake) otherwise."""
    print(run_check(exercise(name), function))
