"""`labkit report --executor dask`: a tiny grid of notebook 07 on a 2-worker `LocalCluster` gives the metrics of the
default executor ("sequential" below: the spawned-process pool `labkit report` has always used, whose cells are the
reference here whether it runs one or two at a time); a worker killed mid-notebook fails that run only; the CLI
refuses what cannot work."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from labkit.cli.main import main
from labkit.core.paths import project_root
from labkit.report.executors import ExecutorConfig, local_cluster, run_in_worker
from labkit.report.run import run_report

SAMPLE = project_root() / "data_samples" / "storystream-mini"
CELL = "07_long_story_ablation-policy={}"
# the smallest cells notebook 07 runs (one story, 3 segments, 2 Euler steps): a kernel's start dominates; the same
# as the session's sequential report (tests/report/conftest.py), which also holds three runs that fail
TINY_CELLS = "parameters: {segments: 3, stories: 1, sample_steps: 2, adaptation: full, seeds: 1}"


def grid_file(folder, policies: list[str]):
    path = folder / "grid.yaml"
    path.write_text(
        f"blocks:\n  - notebook: 07_long_story_ablation.ipynb\n    axes: {{policy: [{', '.join(policies)}]}}\n"
        f"    {TINY_CELLS}\n",
        encoding="utf-8",
    )
    return path


def timed_report(out, grid, **options) -> tuple[dict, list[dict], float]:
    """(summary.json, the failed runs, wall seconds) of a grid-only report on the committed sample data."""
    start = time.perf_counter()
    _, failed = run_report("tiny", out, grid, progress=False, course=False, data_root=SAMPLE, **options)
    seconds = time.perf_counter() - start
    return json.loads((out / "summary.json").read_text(encoding="utf-8")), failed, seconds


def by_run(summary: dict) -> dict[str, dict]:
    return {r["run"]: r for r in summary["runs"]}


@pytest.fixture(scope="module")
def cluster():
    """An existing 2-worker cluster, reached by its address as `--scheduler` would reach a remote one."""
    from distributed import Client

    with local_cluster(2) as running, Client(running) as client:
        yield running.scheduler_address, client


@pytest.mark.slow
def test_each_worker_of_a_local_cluster_gets_its_own_gpu_and_the_callers_variables(cluster):
    address, client = cluster
    names = {info["name"]: worker for worker, info in client.scheduler_info(n_workers=-1)["workers"].items()}
    assert sorted(names) == [0, 1]

    def visible(name, gpus):
        task = client.submit(
            run_in_worker, os.getenv, "CUDA_VISIBLE_DEVICES", {}, gpus, workers=[names[name]], pure=False
        )
        return task.result()

    assert [visible(0, ["5", "7"]), visible(1, ["5", "7"]), visible(1, ["3"])] == ["5", "7", "3"]
    seen = client.submit(run_in_worker, os.getenv, "LABKIT_MARK", {"LABKIT_MARK": "set"}, [], pure=False).result()
    after = client.submit(os.getenv, "LABKIT_MARK", pure=False).result()
    assert (seen, after) == ("set", None)  # set for the task's kernel, restored afterwards


def kill_when_running(client, cell: str, partial, log: list, stop: threading.Event) -> None:
    """SIGKILL the worker whose task runs `cell` once its kernel has finished a notebook cell (mid-notebook)."""
    while not stop.is_set():
        time.sleep(0.2)
        try:
            cells = json.loads(partial.read_text())["cells"]
            done = [c for c in cells if c["metadata"].get("papermill", {}).get("status") == "completed"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            continue
        holders = [w for w, keys in client.processing().items() if any(str(k).startswith(cell) for k in keys)]
        if done and holders:
            pid = client.run(os.getpid, workers=holders)[holders[0]]
            os.kill(pid, signal.SIGKILL)
            log.append(pid)
            return


@pytest.mark.slow
def test_a_4_cell_grid_on_a_2_worker_cluster_has_the_sequential_metrics_even_when_a_worker_dies(
    sequential_report, cluster, tmp_path
):
    """One report on a 2-worker LocalCluster reached by its address (`--scheduler`), the worker running `sink` killed
    mid-notebook: that cell alone fails and the three others have the sequential run's metrics. The command again,
    with `--executor dask`'s own LocalCluster, runs only the lost cell (the others are reused): then every cell and
    table equals the sequential run's. (The wall-time ratio dask/sequential is measured by hand: BENCHMARKS.md.)"""
    address, client = cluster
    reference = sequential_report.summary  # the same four cells on the default executor (and three failing runs)
    expected = by_run(reference)
    cells = [CELL.format(policy) for policy in ("dense", "window", "sink", "mm-sink")]
    grid = grid_file(tmp_path, ["dense", "window", "sink", "mm-sink"])
    victim = CELL.format("sink")
    out = tmp_path / "report"
    killed: list[int] = []
    stop = threading.Event()
    partial = out / "executed" / f"{victim}.partial.ipynb"
    killer = threading.Thread(target=kill_when_running, args=(client, victim, partial, killed, stop))
    killer.start()
    try:
        summary, failed, _ = timed_report(out, grid, workers=2, executor=ExecutorConfig("dask", address))
    finally:
        stop.set()
        killer.join()
    assert killed, "the victim's worker was never seen running it"
    runs = by_run(summary)
    lost = runs[victim]
    assert [r["run"] for r in failed] == [victim] and lost["status"] == "failed" and "metrics" not in lost
    assert "died while running this notebook (KilledWorker)" in lost["error"]
    assert lost["partial"].endswith(f"{victim}.partial.ipynb")
    assert not (out / "runs" / victim / "metrics.json").exists()  # its kernel died with the worker
    for cell in cells:
        if cell != victim:
            assert runs[cell]["status"] == "ok" and runs[cell]["metrics"] == expected[cell]["metrics"], cell
    assert runs["08_report"]["status"] == "ok"
    assert summary["machine"]["executor"] == "dask" and summary["machine"]["executor_workers"] == 2

    # again, on the default executor of `--executor dask`: a LocalCluster of its own, closed at the end
    summary, failed, _ = timed_report(out, grid, workers=1, executor=ExecutorConfig("dask"))
    runs = by_run(summary)
    assert failed == [] and runs[victim]["status"] == "ok"
    assert sorted(r for r in cells if runs[r]["status"] == "reused") == sorted(set(cells) - {victim})
    for cell in cells:
        assert runs[cell]["metrics"]["overall"]["char_acc"] is not None
        assert runs[cell]["metrics"] == expected[cell]["metrics"], cell
    assert summary["table2"] == reference["table2"]
    assert set(summary) == set(reference) and all(set(runs[r]) - {"status"} <= set(expected[r]) for r in runs)
    assert expected[CELL.format("nosuch")]["status"] == "failed"  # the reference's own failures stayed its own


# ---- the command line ------------------------------------------------------------------------------------


def test_the_cli_refuses_a_scheduler_without_dask_bad_workers_and_missing_dask(tmp_path, capsys, monkeypatch):
    grid = grid_file(tmp_path, ["dense"])
    out = tmp_path / "r"
    base = ["report", "--grid", str(grid), "--out", str(out), "--grid-only", "--quiet"]
    assert main([*base, "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert "parameter --scheduler" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "parameter --workers: must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the `dask` extra were not installed
    assert main([*base, "--executor", "dask"]) == 2
    assert "pip install 'seed-story-lab[dask]'" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
