"""Executing the course site's notebooks (`python book/build_book.py --execute`, and the browser test when the
report's are missing or stale): each notebook once with papermill, with its default parameters but live training
off as in the report, two at a time, one thread each, into a folder of their own, each with a stamp as `labkit
report` writes one. `stale_notebooks` says which notebooks of a folder no longer match their notebook in notebooks/.

Which notebooks the site shows (REPORT_NOTEBOOKS) and where `make report` writes them executed (`executed_folder`)
are defined here, beside the execution order that lists them: staging (stage.py) reads them from there.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_07 = "07_long_story_ablation-policy=mm-sink-segments=25-adaptation=full-seed=0"
REPORT_NOTEBOOKS = [
    "00_quickstart",
    "01_storystream_data",
    "02_visual_tokenizer",
    "03_stage1_detokenizer",
    "04_stage2_mllm",
    "05_attention_sinks",
    "06_stage3_adaptation",
    EXAMPLE_07,
    "08_report",
]
# `execute_notebooks`: longest first (seconds with EXECUTE_PARAMETERS, two at a time on a busy two-core machine),
# so that no long notebook starts while the other worker idles
EXECUTION_ORDER = [
    EXAMPLE_07,  # about 65 s
    "05_attention_sinks",  # 70
    "03_stage1_detokenizer",  # 65
    "08_report",  # 65
    "02_visual_tokenizer",  # 65
    "06_stage3_adaptation",  # 45
    "00_quickstart",  # 45
    "04_stage2_mllm",  # 30
    "01_storystream_data",  # 20
]
EXECUTE_WORKERS = 2
# What `execute_notebooks` passes besides the defaults: the stage notebooks' live training (`train_live`, on by
# default for a student) off, as in the report, so their pages show the reference checkpoints as the report's do.
# Live, the training and scoring took 06 and 03 about 12 and 9 minutes instead of about 1 (on a busy two-core
# machine). Every other parameter keeps its default (07's are the report's mm-sink cell of Table 2; 08 reads the
# committed report).
EXECUTE_PARAMETERS = {
    "02_visual_tokenizer": {"train_live": False},
    "03_stage1_detokenizer": {"train_live": False},
    "04_stage2_mllm": {"train_live": False},
    "06_stage3_adaptation": {"train_live": False},
}
# One thread per kernel: two two-thread torch kernels side by side thrash a two-core machine (and the report's
# notebooks run with one thread too, so the numbers match it).
THREAD_VARIABLES = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class ExecutionFailed(RuntimeError):
    pass


def executed_folder(preset: str = "tiny") -> Path:
    """Where `make report` writes the executed notebooks (the build's default)."""
    return ROOT / "reports" / preset / "executed"


def source_notebook(name: str) -> Path:
    """The notebook in notebooks/ that executed notebook `name` was run from (07_...-policy=... from 07_...)."""
    return ROOT / "notebooks" / f"{name.split('-')[0]}.ipynb"


def _digest(source: Path, parameters: dict) -> str | None:
    """The stamp digest `labkit report` writes next to an executed notebook (parameters, notebook text, thread
    count); None when labkit's report module no longer offers it."""
    try:
        from labkit.report.grid import GridRun
        from labkit.report.run import _run_digest
    except ImportError:
        return None
    return _run_digest(GridRun(source.name, parameters, ""), source)


def stale_notebooks(folder: Path | str, names: list[str] | None = None) -> list[str]:
    """The notebooks of `names` (default: the site's) that `folder` lacks or holds out of date: its stamp (the .json
    beside it, written by `labkit report` and by `execute_notebooks`) does not match the digest of the parameters
    it ran with (papermill records them in the notebook) and the current notebook in notebooks/. Without a digest
    to compare (no stamp, or labkit cannot make one) a notebook older than its source is stale."""
    folder = Path(folder)
    stale = []
    for name in names or REPORT_NOTEBOOKS:
        executed, source = folder / f"{name}.ipynb", source_notebook(name)
        if not executed.is_file() or not source.is_file():
            stale.append(name)
            continue
        try:
            stamp = json.loads(executed.with_suffix(".json").read_text(encoding="utf-8"))
            metadata = json.loads(executed.read_text(encoding="utf-8"))["metadata"]["papermill"]
            digest = _digest(source, metadata.get("parameters") or {})
        except (OSError, ValueError, KeyError, TypeError):
            stamp, digest = {}, None
        if digest is not None and stamp.get("digest") is not None:
            current = stamp["digest"] == digest
        else:
            current = executed.stat().st_mtime > source.stat().st_mtime
        if not current:
            stale.append(name)
    return stale


def _execute_one(name: str, out_dir: str, parameters: dict, digest: str | None) -> tuple[str, float, str | None]:
    """Run one notebook with papermill into out_dir/<name>.ipynb (in a worker process: it imports no torch); (name,
    seconds, error). `digest` goes into its stamp."""
    import papermill

    source = source_notebook(name)
    target = Path(out_dir) / f"{name}.ipynb"
    partial = Path(out_dir) / f"{name}.partial.ipynb"
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(partial),
            parameters=parameters,
            cwd=str(source.parent),
            kernel_name="python3",
            progress_bar=False,
        )
    except Exception as error:  # the partial notebook stays, for a look at the failing cell
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return name, time.perf_counter() - start, lines[-1] if lines else type(error).__name__
    seconds = time.perf_counter() - start
    partial.replace(target)
    stamp = {"digest": digest, "seconds": round(seconds, 2), "parameters": parameters}
    target.with_suffix(".json").write_text(json.dumps(stamp) + "\n", encoding="utf-8")
    return name, seconds, None


@contextlib.contextmanager
def _one_thread():
    """One thread: the variables the kernels read at start-up, and this process's torch; restored afterwards."""
    import torch

    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    threads = torch.get_num_threads()
    os.environ.update(THREAD_VARIABLES)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebooks(
    out_dir: Path | str,
    preset: str = "tiny",
    names: list[str] | None = None,
    workers: int = EXECUTE_WORKERS,
    parameters: dict[str, dict] | None = None,
    echo=print,
) -> dict[str, float]:
    """Execute the site's notebooks (or `names`) with papermill into `out_dir`, under the report's file names, each
    with its default parameters but those of `parameters` ({name: {parameter: value}}, default EXECUTE_PARAMETERS:
    no live training; {}: the defaults alone); `preset` is passed only when it is not the notebooks' default, tiny.
    Kernel python3, working directory notebooks/, `workers` at a time in separate processes, one thread each,
    longest first. Each notebook gets a stamp as `labkit report` writes one. Returns {name: seconds}; raises
    ExecutionFailed naming every notebook that failed (after all have run)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(names) if names is not None else list(REPORT_NOTEBOOKS)
    todo = [name for name in EXECUTION_ORDER if name in wanted] + [n for n in wanted if n not in EXECUTION_ORDER]
    chosen = EXECUTE_PARAMETERS if parameters is None else parameters
    given = {name: {**chosen.get(name, {}), **({} if preset == "tiny" else {"preset": preset})} for name in todo}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    if not todo:
        return seconds
    with _one_thread():  # set before the pool starts: its workers, and the kernels they start, inherit it
        # the data set the notebooks share is made here, once, before two kernels could both start making it
        from labkit.core.presets import get_preset
        from labkit.data.storystream_mini import ensure_dataset

        ensure_dataset(get_preset(preset), progress=False)
        # spawned: this process may have imported torch, whose thread pools do not survive a fork; processes:
        # papermill chdir()s the whole process while a notebook runs
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
            # each stamp's digest is of the notebook's text as it starts (labkit, torch: imported here, once)
            digests = {name: _digest(source_notebook(name), given[name]) for name in todo}
            futures = [pool.submit(_execute_one, name, str(out), given[name], digests[name]) for name in todo]
            for done, future in enumerate(as_completed(futures), 1):
                name, took, error = future.result()
                seconds[name] = took
                if error:
                    failed.append(f"{name}.ipynb: {error} (the partial notebook: {out / name}.partial.ipynb)")
                echo(f"book: {'FAILED' if error else 'executed'} {name} in {took:.0f} s ({done}/{len(todo)})")
    if failed:
        raise ExecutionFailed(f"{len(failed)} notebook(s) failed to execute:\n" + "\n".join(failed))
    return seconds
