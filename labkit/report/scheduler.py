"""Which of the report's notebook runs may execute side by side, and the scheduler that runs them so (it also
runs `labkit report --retrain`'s stages, each once the stages it reads have finished).

`labkit report` runs its notebooks `labkit.report.run.REPORT_WORKERS` at a time, each kernel on one thread. Runs
are started in the order given as workers free up, with one exception: the grid cells of one *generation group*
(`generation_group`: the same notebook and parameters but for the de-tokenizer and the folders) continue the same
stories under the same policy, and the first of them to finish writes the on-disk generation cache that the others
read. Two of them running at once would both generate, so a group's runs execute one at a time, in the given order,
while runs of other groups overtake them.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from typing import Callable, Collection, Hashable, Sequence, TypeVar

from labkit.core.errors import LabError
from labkit.report.grid import GridRun

Run = TypeVar("Run")
Result = TypeVar("Result")

# Parameters of a grid cell that do not change the stories it generates (`story_ablation._generation_key` reads
# only the policy, its cache sizes, the segments and the stories continued): the de-tokenizer, how the images are
# drawn, whether the ground truth is also scored, and where the data and outputs are. Cells that differ only in
# these share one generation. Leaving a parameter out of this list is safe (less parallelism); putting in one
# that does change the generation would let two cells fill the same cache at once (wasted work, not wrong files:
# the cache is written atomically).
NOT_GENERATION = ("adaptation", "sample_steps", "guidance_scale", "teacher_forced", "out_dir", "data_dir")


def generation_group(run: GridRun) -> str | None:
    """The key of the runs that share `run`'s generated stories; None for a run without grid axes (a course
    notebook), which shares nothing and may run beside anything."""
    if not run.axes:
        return None
    shared = {k: v for k, v in run.parameters.items() if k not in NOT_GENERATION}
    return json.dumps([run.notebook, shared], sort_keys=True, default=str)


def schedule(
    runs: Sequence[Run],
    execute: Callable[[Run], Result],
    workers: int,
    group: Callable[[Run], Hashable | None] = lambda run: None,
    on_start: Callable[[Run], None] | None = None,
    on_finish: Callable[[Run, Result], None] | None = None,
    pool: Callable[[int], Executor] = ThreadPoolExecutor,
    needs: Callable[[Run], Collection[int]] = lambda run: (),
) -> list[Result]:
    """`[execute(run) for run in runs]`, at most `workers` at a time in a `pool(workers)`, results in the order of
    `runs`. A run starts when a worker is free, every run it `needs` (indices into `runs`) has finished, and no run
    of its (non-None) `group` is executing; among the runs that may start, the earliest goes first, so a group keeps
    its order. `on_start` and `on_finish` run in the calling thread (a progress bar may use them). An exception from
    `execute` stops new starts and propagates once the running runs end; LabError if runs wait on each other."""
    keys = [group(run) for run in runs]
    prerequisites = [set(needs(run)) for run in runs]
    waiting = list(range(len(runs)))  # indices of the runs not started yet, in order
    running: dict[Future, int] = {}
    done_runs: set[int] = set()
    results: list = [None] * len(runs)
    workers = max(1, workers)
    with pool(workers) as executor:
        while waiting or running:
            busy = {keys[i] for i in running.values()}
            for index in list(waiting):
                if len(running) >= workers:
                    break
                if keys[index] is not None and keys[index] in busy or not prerequisites[index] <= done_runs:
                    continue
                waiting.remove(index)
                busy.add(keys[index])
                running[executor.submit(execute, runs[index])] = index
                if on_start:
                    on_start(runs[index])
            if not running:
                raise LabError(f"{[runs[i] for i in waiting]} wait on each other (or on runs not scheduled)")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=running.get):  # finished together: report them in the given order
                index = running.pop(future)
                results[index] = future.result()
                done_runs.add(index)
                if on_finish:
                    on_finish(runs[index], results[index])
    return results
