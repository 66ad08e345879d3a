"""How far a report made on another machine may differ from the committed one, and the check that says so.

Everything under a cell's `metrics` is fixed by the seed on one machine (two runs agree exactly), and the report's
notebooks always run with `labkit.report.run.REPORT_THREADS` threads. Across machines the last bits still differ:
CPUs of other models take other vector kernels inside torch, so sums round differently. Measured between two
2-core x86 machines (the one that made the committed report and the one that re-made it, README
"Reproducibility"): at most 1.4e-4 on a per-segment CLIP-analogue of a 100-segment story, and a relative 1.5e-5
on Table 2 and Table 4. `MACHINE_TOLERANCE` allows seven times that.
"""

from __future__ import annotations

from typing import Iterator

MACHINE_TOLERANCE = 1e-3  # absolute, on every number under a cell's `metrics`


def numbers(tree: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, leaf) for every leaf of a nested dict/list, e.g. ("per_segment.clip[3]", 0.41)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from numbers(value, f"{prefix}[{index}]")
    else:
        yield prefix, tree


def metric_differences(committed: dict, fresh: dict, tolerance: float = MACHINE_TOLERANCE) -> list[str]:
    """What in `fresh` (a cell's `metrics`) is not `committed` within `tolerance`: one readable line each.
    A number that is missing (None) on one side only counts as a difference."""
    first, second = dict(numbers(committed)), dict(numbers(fresh))
    problems = []
    for path in sorted(first.keys() | second.keys()):
        a, b = first.get(path), second.get(path)
        if (
            isinstance(a, bool)
            or isinstance(b, bool)
            or not isinstance(a, (int, float))
            or not isinstance(b, (int, float))
        ):
            if a != b:
                problems.append(f"{path}: {a!r} vs {b!r}")
        elif abs(a - b) > tolerance:
            problems.append(f"{path}: {a:.6g} vs {b:.6g} (differs by {b - a:+.2e}, allowed ±{tolerance:g})")
    return problems


def report_differences(committed: dict, fresh: dict, tolerance: float = MACHINE_TOLERANCE) -> list[str]:
    """`metric_differences` for every grid cell of two `summary.json` dicts, prefixed with the cell's run name."""
    first = {run["run"]: run["metrics"] for run in committed["runs"] if run.get("metrics")}
    second = {run["run"]: run["metrics"] for run in fresh["runs"] if run.get("metrics")}
    lines = [f"{run}: only in one report" for run in sorted(first.keys() ^ second.keys())]
    for run in sorted(first.keys() & second.keys()):
        lines += [f"{run}: {line}" for line in metric_differences(first[run], second[run], tolerance)]
    return lines
