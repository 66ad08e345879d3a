"""`labkit report`: run the lab's notebooks with papermill over the ablation grid; write `reports/<preset>/`.

Three kinds of runs: the course notebooks 00-06 (each once, on the reference checkpoints), the grid's runs
(`grids/<preset>.yaml`: notebook 07 once per policy × length × adaptation × seed) and notebook 08, which aggregates
them. The first two kinds run `REPORT_WORKERS` at a time, in that order as workers free up (cells that share
generated stories one after another: `labkit.report.scheduler`); notebook 08 runs last, alone. A run whose executed
notebook exists with the same parameters is reused, so an interrupted report resumes and a second one costs
seconds. A failing run is recorded (its error and the partial notebook) and the others go on; the command then
exits non-zero. Outputs::

    reports/<preset>/executed/<run>.ipynb       executed notebooks (`<run>.partial.ipynb` for failed ones)
    reports/<preset>/html/<run>.html            HTML exports
    reports/<preset>/runs/<run>/                a grid run's metrics.json and strip.png
    reports/<preset>/summary.json               preset, commit, packages, wall time, runs, table2, table4, findings
    reports/<preset>/index.md, index.html       the paper's tables beside the lab's, findings, runs
"""

from __future__ import annotations

import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from labkit.core.artifacts import ARTIFACTS, locate_artifact, read_manifest, require
from labkit.core.atomic import write_text
from labkit.core.devices import default_device
from labkit.core.paths import portable_path, project_root
from labkit.core.presets import REPORT_PRESET_ENV, get_preset
from labkit.core.provenance import cpu_model, git_commit, package_versions
from labkit.data.storystream_mini import ensure_dataset
from labkit.experiments.story_ablation import finite
from labkit.report.executors import ExecutorConfig, environment, open_pool, thread_environment
from labkit.report.findings import findings
from labkit.report.grid import GridRun, default_grid, load_grid, undeclared_parameters
from labkit.report.index import index_html, index_markdown
from labkit.report.paper_tables import stress, table2, table4
from labkit.report.scheduler import generation_group, schedule


def _portable(parameters: dict) -> dict:
    return {k: portable_path(v) if isinstance(v, str) and v.startswith("/") else v for k, v in parameters.items()}


# Floating point depends on how many threads split a sum, so every notebook of the report runs with the same
# count on any machine (README, "Reproducibility"): 1. The models are tiny, so a second thread in a kernel helps
# little; two one-thread kernels side by side (REPORT_WORKERS) use two cores far better.
REPORT_THREADS = 1
# Notebooks executing at once (at most the machine's cores). It does not change any number: each kernel is its own
# process with REPORT_THREADS threads, and cells sharing generated stories never run together (`generation_group`).
REPORT_WORKERS = 2


def course_runs(preset: str, data: str) -> list[GridRun]:
    """The notebooks every report runs once, each on the reference checkpoints (`train_live=False`)."""
    common = {"data_dir": data, "preset": preset}
    return [
        GridRun("00_quickstart.ipynb", common, "Quickstart: a 25-segment story from the trained tiny model"),
        GridRun("01_storystream_data.ipynb", common, "The StoryStream data and the story world"),
        GridRun(
            "02_visual_tokenizer.ipynb", {**common, "train_live": False}, "Stage 0: the visual tokenizer and the judges"
        ),
        GridRun(
            "03_stage1_detokenizer.ipynb",
            {**common, "train_live": False},
            "Stage 1: the VAE and the de-tokenizer: reconstructions from features",
        ),
        GridRun(
            "04_stage2_mllm.ipynb",
            {**common, "train_live": False},
            "Stage 2: the MLLM: losses, captions, regressed features",
        ),
        GridRun(
            "05_attention_sinks.ipynb",
            {"preset": preset, "trace_segments": 25, "long_context_stories": 2, "stress_stories": 0},
            "KV-cache policies, the RoPE clock, long-context curves (30 segments), attention sinks",
        ),
        GridRun(
            "06_stage3_adaptation.ipynb",
            {**common, "train_live": False},
            "Stage 3: adapting the de-tokenizer, official vs full (the paper's Table 4)",
        ),
    ]


def _grid_runs(grid: Path, preset: str, out: Path) -> list[GridRun]:
    runs = load_grid(grid)
    for run in runs:
        run.parameters = {**run.parameters, "preset": preset, "out_dir": str(out / "runs" / run.run_id)}
    return runs


def _with_data(runs: list[GridRun], data: str) -> list[GridRun]:
    for run in runs:
        run.parameters = {**run.parameters, "data_dir": data}
    return runs


def _prune(out: Path, keep: set[str]) -> None:
    """Remove grid cells of earlier reports that the current grid no longer has (the tables read every cell)."""
    import shutil

    for folder in (out / "runs").glob("*"):
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder)


def _records_digest(out: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((out / "runs").glob("*/metrics.json")):
        digest.update(path.parent.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _run_digest(run: GridRun, source: Path) -> str:
    """The run's parameters, its notebook's text and the kernels' thread count (it changes the numbers): a finished
    run is reused only if none of them changed."""
    import hashlib

    text = source.read_bytes() if source.is_file() else b""
    return hashlib.sha256(run.digest().encode() + text + f"threads={REPORT_THREADS}".encode()).hexdigest()[:16]


def _result(run: GridRun) -> dict:
    """The run's entry in summary.json's `runs`, before its status is known."""
    return {
        "run": run.run_id,
        "notebook": run.notebook,
        "title": run.title,
        "parameters": _portable(run.parameters),
        "axes": run.axes,
        "status": "ok",
        "seconds": 0.0,
    }


def _lost(run: GridRun, why: str, seconds: float, out: Path) -> dict:
    """The failed entry of a run whose worker died under it (`--executor dask`), with its partial notebook if
    papermill had written one."""
    partial = out / "executed" / f"{run.run_id}.partial.ipynb"
    found = portable_path(partial) if partial.is_file() else None
    return {**_result(run), "status": "failed", "seconds": seconds, "error": why, "partial": found}


def _last_seconds(out: Path) -> dict[str, float]:
    """How long each run took when it last executed: its stamp, else the last summary.json in `out` (committed:
    a fresh clone has no stamps), whatever its parameters were then. Runs never timed are missing."""
    summary = out / "summary.json"
    seconds = {}
    if summary.is_file():
        seconds = {r["run"]: r.get("seconds") or 0.0 for r in json.loads(summary.read_text(encoding="utf-8"))["runs"]}
    for stamp in (out / "executed").glob("*.json"):
        seconds[stamp.stem] = json.loads(stamp.read_text(encoding="utf-8")).get("seconds", 0.0)
    return seconds


def _reused(run: GridRun, out: Path) -> dict | None:
    """The result of an identical run that already finished (it is reused), or None."""
    executed = out / "executed" / f"{run.run_id}.ipynb"
    stamp = executed.with_suffix(".json")
    finished = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() and executed.is_file() else {}
    if finished.get("digest") != _run_digest(run, project_root() / "notebooks" / run.notebook):
        return None
    cells = finished.get("cell_seconds") or cell_seconds(executed)
    return {**_result(run), "status": "reused", "seconds": finished["seconds"], "cell_seconds": cells}


def cell_seconds(executed: Path) -> list[list]:
    """[cell index, seconds, its first line that is not an import] of each code cell of an executed notebook, from
    papermill's stamps: the course's runtime tables are made from these (summary.json is committed, the executed
    notebooks are not)."""
    import nbformat

    timed = []
    for index, cell in enumerate(nbformat.read(executed, as_version=4).cells):
        if cell.cell_type == "code":
            lines = [line.strip() for line in cell.source.splitlines() if line.strip()]
            doing = [line for line in lines if not line.startswith(("import ", "from ", "#"))] or lines or [""]
            seconds = float(cell.metadata.get("papermill", {}).get("duration") or 0.0)
            timed.append([index, round(seconds, 2), doing[0][:80]])
    return timed


def _execute(run: GridRun, out: Path) -> dict:
    """Run one notebook (callers decide reuse with `_reused` first); never raises for a failing notebook."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    executed = out / "executed" / f"{run.run_id}.ipynb"
    partial = executed.with_suffix(".partial.ipynb")
    stamp = executed.with_suffix(".json")
    source = project_root() / "notebooks" / run.notebook
    digest = _run_digest(run, source)
    result = _result(run)
    if not source.is_file():
        return {**result, "status": "failed", "error": f"{source}: notebook not found", "partial": None}
    undeclared = undeclared_parameters(source, run.parameters)
    if undeclared:
        return {
            **result,
            "status": "failed",
            "partial": None,
            "error": f"{run.notebook}: no such parameter(s) {undeclared} in its parameters cell "
            "(check the grid's keys)",
        }
    executed.parent.mkdir(parents=True, exist_ok=True)
    stale = out / "runs" / run.run_id / "metrics.json"  # a cell's record must come from this very run
    stale.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(partial),
            parameters=run.parameters,
            cwd=str(source.parent),
            progress_bar=False,
            kernel_name="python3",
        )
    except Exception as error:  # a notebook failing mid-run: record it, keep the partial notebook, go on
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return {
            **result,
            "status": "failed",
            "seconds": round(time.perf_counter() - start, 2),
            "error": lines[-1] if lines else type(error).__name__,
            "partial": portable_path(partial),
        }
    seconds = round(time.perf_counter() - start, 2)
    partial.replace(executed)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    write_text(out / "html" / f"{run.run_id}.html", body)
    cells = cell_seconds(executed)
    write_text(stamp, json.dumps({"digest": digest, "seconds": seconds, "cell_seconds": cells}) + "\n")
    return {**result, "seconds": seconds, "cell_seconds": cells}


def collect_records(out: Path) -> list[dict]:
    """Every finished grid cell's record (runs/<run>/metrics.json), sorted by run name, with `run` set."""
    return [
        {**json.loads(p.read_text(encoding="utf-8")), "run": p.parent.name}
        for p in sorted((Path(out) / "runs").glob("*/metrics.json"))
    ]


def feature_loader(out: Path):
    """`load_features` for paper_tables: a cell's FID-analogue features from its run folder (None if it has none)."""

    def load(record: dict) -> dict | None:
        name = (record.get("files") or {}).get("fid_features")
        if not name or "run" not in record:
            return None
        path = Path(out) / "runs" / record["run"] / name
        return load_file(str(path)) if path.is_file() else None

    return load


RETRAIN_CHECK = "reports/tiny-retrain-check/against-two-thread-references/comparison.json"


def model_under_study(preset: str) -> dict | None:
    """The BOS sink per layer of the pre-trained LM and of the MLLM after stage 2, from their manifests."""
    lm, mllm = locate_artifact("lm", preset), locate_artifact("mllm", preset)
    if lm is None or mllm is None:
        return None
    lm_manifest, mllm_manifest = read_manifest(lm), read_manifest(mllm)
    return {
        "lm": {"corpus": lm_manifest.get("corpus"), "bos_ratio": lm_manifest.get("bos_ratio")},
        "mllm": {"bos_ratio": mllm_manifest.get("bos_ratio"), "final": mllm_manifest.get("metrics", {}).get("final")},
    }


def retraining_variance(path: Path | None = None) -> dict | None:
    """How far one retrain with other float rounding moved each 25-segment metric (`reports/tiny-retrain-check`):
    the largest absolute change over cells (relative for the FID-analogue), and how many cells it covers."""
    path = path or project_root() / RETRAIN_CHECK
    if not path.is_file():
        return None
    cells = {k: v for k, v in json.loads(path.read_text(encoding="utf-8"))["cells"].items() if "segments=25" in k}
    largest: dict[str, float] = {}
    for changes in cells.values():
        for metric, change in changes.items():
            if change is not None:
                largest[metric] = max(largest.get(metric, 0.0), abs(change))
    return {"source": RETRAIN_CHECK, "cells": len(cells), "largest_change": largest}


def build_tables(out: Path | str, preset: str = "tiny") -> dict:
    """table2, table4, stress and findings from the cells under `out`, with the judges' own accuracies."""
    records = collect_records(Path(out))
    manifests = {}
    for mode in ("official", "full"):
        folder = locate_artifact(f"detokenizer_{mode}", preset)
        if folder is not None:
            manifests[mode] = read_manifest(folder)
    folder = locate_artifact("judges", preset)
    judges = read_manifest(folder)["metrics"] if folder else None
    load = feature_loader(out)
    t2, t4 = table2(records, load), table4(records, manifests, load)
    stress_rows = stress(records, load)
    return {
        "table2": t2,
        "table4": t4,
        "stress": stress_rows,
        "findings": findings(t2, t4, records, judges=judges, load_features=load, stress_rows=stress_rows),
        "judges": judges,
        "model": model_under_study(preset),
        "retraining_variance": retraining_variance(),
    }


def run_report(
    preset: str = "tiny",
    out: Path | None = None,
    grid: Path | str | None = None,
    progress: bool = True,
    course: bool = True,
    data_root: Path | str | None = None,
    rerun: bool = False,
    workers: int | None = None,
    executor: ExecutorConfig | None = None,
) -> tuple[Path, list[dict]]:
    """Run every notebook of the report and write its folder; returns (index.md, the failed runs).

    `course=False` runs only the grid and notebook 08; `data_root` replaces the preset's data set; `rerun`
    executes every notebook even if an identical run finished (after changing labkit's code, say); `workers`
    notebooks run at once (default `REPORT_WORKERS`, at most the cores; 1: one after another; on an existing dask
    cluster, its workers' threads); `executor` where they run (`labkit.report.executors`: spawned processes by
    default, or dask.distributed). Notebook 08 always runs here, last."""
    executor = (executor or ExecutorConfig()).check()
    config = get_preset(preset)  # fail fast on an unknown preset, before any work
    out = Path(out).resolve() if out else project_root() / "reports" / preset  # notebooks run in notebooks/
    runs = _grid_runs(Path(grid) if grid else default_grid(preset), preset, out)  # a bad grid file stops here
    for name in ARTIFACTS:  # the report never trains: anything missing is an error naming its `labkit train` command
        require(name, preset)
    _prune(out, {run.run_id for run in runs})
    start = time.perf_counter()
    data = str(Path(data_root).resolve()) if data_root else str(ensure_dataset(config, progress))
    runs = (course_runs(preset, data) if course else []) + _with_data(runs, data)
    workers = max(1, workers) if workers is not None else None
    default_workers = min(REPORT_WORKERS, os.cpu_count() or 1)
    bar = tqdm(total=len(runs) + 1, desc="report", unit="run", disable=not progress)
    running: list[str] = []  # the bar's postfix: the runs executing now

    def started(run: GridRun) -> None:
        running.append(run.run_id)
        bar.set_postfix_str(", ".join(running))

    def finished(run: GridRun, result: dict) -> None:
        running.remove(run.run_id)
        bar.set_postfix_str(", ".join(running), refresh=False)
        bar.update()

    # Finished runs are reused here: a report with nothing to run starts no worker (each imports torch: seconds).
    results = [None if rerun else _reused(run, out) for run in runs]
    bar.update(len(runs) - results.count(None))
    # Set before the pool starts (its workers, and the kernels, inherit them): the kernels' thread count, and the
    # preset, since the notebooks' text quotes tiny and at another preset their claims report differences instead.
    with environment({**thread_environment(REPORT_THREADS), REPORT_PRESET_ENV: preset}):
        execute = functools.partial(_execute, out=out)
        # longest first (as the last report timed them), so that no long run starts while the other worker idles
        last = _last_seconds(out)
        todo = sorted(
            (run for run, result in zip(runs, results) if result is None), key=lambda r: -last.get(r.run_id, 0)
        )
        executed, at_once, pool_workers = [], workers or default_workers, workers or default_workers
        if todo:  # a report with nothing to run starts no worker and no cluster
            lost = functools.partial(_lost, out=out)
            pool, at_once, pool_workers = open_pool(executor, workers, default_workers, REPORT_THREADS, lost)
            executed = schedule(todo, execute, at_once, generation_group, started, finished, pool=lambda _: pool)
        by_id = {run.run_id: result for run, result in zip(todo, executed)}
        results = [result if result is not None else by_id[run.run_id] for run, result in zip(runs, results)]
        final = GridRun(
            "08_report.ipynb",
            {"preset": preset, "report_dir": str(out), "cells": _records_digest(out)},
            "The report: the paper's Table 2 and Table 4 beside the lab's, and the findings",
        )
        started(final)  # after every other run, alone: it reads them all
        with ThreadPoolExecutor(1) as side:  # the summary's tables, made here while notebook 08's kernel makes its own
            tables = side.submit(build_tables, out, preset)
            results.append((None if rerun else _reused(final, out)) or _execute(final, out))
            tables = tables.result()
        finished(final, results[-1])
    bar.close()
    for result in results:
        record = out / "runs" / result["run"] / "metrics.json"
        if result["axes"] and result["status"] != "failed" and record.is_file():
            cell = json.loads(record.read_text(encoding="utf-8"))
            result.update(metrics=cell["metrics"], timings=cell["timings"])
    summary = {
        "preset": preset,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "device": default_device().type,  # `labkit report --device` (LABKIT_DEVICE), which the kernels use
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "notebook_threads": REPORT_THREADS,
            "notebook_workers": at_once,
            "executor": executor.name,
            "executor_workers": pool_workers,
        },
        "wall_seconds": round(time.perf_counter() - start, 2),  # this invocation (seconds when it reused runs)
        # what the notebooks took when they were executed, reused ones included: the cost of making the report
        "notebook_seconds": round(sum(r["seconds"] for r in results), 2),
        "executed_runs": sum(r["status"] != "reused" for r in results),
        "runs": results,
        **tables,
    }
    write_text(out / "summary.json", json.dumps(finite(summary), indent=1) + "\n")
    markdown = index_markdown(summary)
    write_text(out / "index.md", markdown)
    write_text(out / "index.html", index_html(markdown))
    return out / "index.md", [r for r in results if r["status"] == "failed"]
