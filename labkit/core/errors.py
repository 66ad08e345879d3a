"""Errors a user can cause (bad files, bad parameters).

The CLI turns a `LabError` into a one-paragraph message and exit code 2, without a traceback:
anything else is a bug in the lab and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LabError(Exception):
    """A mistake in the user's input: a file, a line or a parameter."""


class DataError(LabError):
    """One or more problems found in a StoryStream file, each located by path and line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


class ParameterError(LabError):
    """A bad value for a named parameter (CLI flag or function argument)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"parameter {name}: {message}")
        self.name = name


def located(path: Path | str, line: int | None, message: str) -> str:
    """Format a problem as `path:line: message`, the way compilers and linters do."""
    return f"{path}:{line}: {message}" if line is not None else f"{path}: {message}"
