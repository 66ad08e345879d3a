"""The report's scheduler: notebooks run side by side, never two cells of one generation group at once, results in
the given order. A fake `execute` sleeps and records when it ran; no kernel, no model."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import pytest

from labkit.core.paths import project_root
from labkit.report.grid import GridRun, load_grid
from labkit.report.scheduler import generation_group, schedule

ABLATION = "07_long_story_ablation.ipynb"


def cell(policy: str, adaptation: str = "full", **fixed) -> GridRun:
    axes = {"policy": policy, "adaptation": adaptation}
    parameters = {"stories": 3, **fixed, **axes, "out_dir": f"/r/runs/{policy}-{adaptation}", "data_dir": "/d"}
    return GridRun(ABLATION, parameters, "a cell", axes=axes)


def course(name: str) -> GridRun:
    return GridRun(f"{name}.ipynb", {"preset": "tiny", "data_dir": "/d"}, "a course notebook")


def fake_execute(run: GridRun, log, seconds: float = 0.15) -> str:
    """Module level, so that a process pool can pickle it: note when the run started and ended, return its id."""
    start = time.monotonic()  # one clock for every process of the machine
    time.sleep(seconds)
    (log / f"{run.run_id}.json").write_text(json.dumps([start, time.monotonic()]))
    return run.run_id


def intervals(log, runs) -> list[tuple[float, float]]:
    return [tuple(json.loads((log / f"{run.run_id}.json").read_text())) for run in runs]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(s <= start < e for s, e in spans) for start, _ in spans)


# ---- the scheduler ----------------------------------------------------------------------------------------


def test_results_keep_the_given_order_and_at_most_workers_run_at_once(tmp_path):
    runs = [course(f"0{i}") for i in range(6)]
    seconds = {run.run_id: 0.3 - 0.04 * i for i, run in enumerate(runs)}  # later runs finish sooner

    def execute(run):
        return fake_execute(run, tmp_path, seconds[run.run_id])

    finished = []
    results = schedule(runs, execute, workers=2, on_finish=lambda run, result: finished.append(result))
    assert results == [run.run_id for run in runs]
    assert finished[0] == runs[1].run_id and sorted(finished) == sorted(results)  # completion order differs
    assert most_at_once(intervals(tmp_path, runs)) == 2


def test_one_worker_runs_them_one_after_another_in_order(tmp_path):
    runs = [course("00"), cell("dense"), cell("dense", "off"), cell("sink")]
    started = []
    results = schedule(runs, partial(fake_execute, log=tmp_path, seconds=0.02), 1, generation_group, started.append)
    assert results == [run.run_id for run in runs] and started == runs
    spans = intervals(tmp_path, runs)
    assert all(before[1] <= after[0] for before, after in zip(spans, spans[1:]))


def test_a_generation_group_runs_one_at_a_time_in_order_while_other_groups_overtake(tmp_path):
    # dense's three adaptations share their stories; sink and window are groups of their own
    runs = [cell("dense", "full"), cell("dense", "off"), cell("sink"), cell("dense", "official"), cell("window")]
    dense = [runs[0], runs[1], runs[3]]
    starts = []
    results = schedule(runs, partial(fake_execute, log=tmp_path), 2, generation_group, lambda run: starts.append(run))
    assert results == [run.run_id for run in runs]
    spans = dict(zip([run.run_id for run in runs], intervals(tmp_path, runs)))
    group = [spans[run.run_id] for run in dense]
    assert all(before[1] <= after[0] for before, after in zip(group, group[1:]))  # never together, in grid order
    assert starts[:2] == [runs[0], runs[2]]  # dense/off waits for dense/full; sink, a free worker, goes first
    assert overlap(spans[runs[0].run_id], spans[runs[2].run_id])  # different groups do run side by side
    assert most_at_once(list(spans.values())) == 2


def test_callbacks_run_in_the_calling_thread_and_an_error_propagates(tmp_path):
    caller, seen = threading.get_ident(), set()

    def execute(run):
        if run.run_id == "boom":
            raise RuntimeError("boom")
        return fake_execute(run, tmp_path, 0.05)

    def note(*_):
        seen.add(threading.get_ident())

    with pytest.raises(RuntimeError, match="boom"):
        schedule([course("00"), course("boom"), course("02")], execute, 2, on_start=note, on_finish=note)
    assert seen == {caller}
    assert schedule([], execute, 2) == []


def test_a_spawned_process_pool_runs_them_too(tmp_path):
    # what `labkit report` uses (`labkit.report.executors.notebook_pool`); the fake is pickled by reference
    runs = [cell("dense", "full"), cell("dense", "off"), cell("sink")]
    pool = partial(ProcessPoolExecutor, mp_context=multiprocessing.get_context("spawn"))
    results = schedule(runs, partial(fake_execute, log=tmp_path, seconds=0.1), 2, generation_group, pool=pool)
    assert results == [run.run_id for run in runs]
    first, second, _ = intervals(tmp_path, runs)
    assert first[1] <= second[0]


# ---- generation groups ------------------------------------------------------------------------------------


def test_generation_group_ignores_what_does_not_change_the_stories():
    key = generation_group(cell("mm-sink", "full"))
    assert key is not None
    assert generation_group(cell("mm-sink", "off")) == key  # also another out_dir
    moved = cell("mm-sink", "full")
    moved.parameters = {**moved.parameters, "data_dir": "/elsewhere", "out_dir": "/x", "sample_steps": 2}
    assert generation_group(moved) == key
    assert generation_group(cell("mm-sink", "off", teacher_forced=False)) == key
    assert generation_group(cell("dense")) != key
    assert generation_group(cell("mm-sink", stories=4)) != key
    assert generation_group(cell("mm-sink", budget="matched")) != key
    other = cell("mm-sink")
    other.notebook = "09_other.ipynb"
    assert generation_group(other) != key
    assert generation_group(course("00_quickstart")) is None  # no grid axes: a course notebook
    assert generation_group(GridRun(ABLATION, {"policy": "dense"}, "a block without axes")) is None


def test_in_the_committed_grid_only_the_table4_cells_share_a_generation():
    runs = load_grid(project_root() / "grids" / "tiny.yaml")
    groups: dict[str, list[str]] = {}
    for run in runs:
        groups.setdefault(generation_group(run), []).append(run.axes["adaptation"])
    shared = [adaptations for adaptations in groups.values() if len(adaptations) > 1]
    # mm-sink at 25 segments: full in the first block, "off" and official in the Table 4 block (which also sets
    # teacher_forced: false, so a key that kept teacher_forced would let full run beside them)
    assert shared == [["full", "off", "official"]]
    assert len(groups) == len(runs) - 2
