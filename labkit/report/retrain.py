"""`labkit report --retrain`: every reference checkpoint trained again from scratch (issue 6).

The committed checkpoints under `checkpoints/<preset>/` were made by this graph with the `reference` schedule,
one thread per stage, so retraining them reproduces their weights byte for byte (measured on the 2-core CPU):
the report does not depend on anything the repository merely ships. The
retrained checkpoints go to a separate folder (never over the committed ones), and the `LABKIT_CHECKPOINTS`
environment variable points every later stage, and every notebook papermill starts, at them.

The stages form a graph, not a line: the VAE and the stage-1 de-tokenizer do not need the MLLM, and the
sink-emergence runs need nothing. Small models use a second core poorly, so two one-thread processes that train
independent stages side by side finish sooner than one two-thread process training them in turn. Each stage
runs in its own process (`python -m labkit.report.retrain STAGE ...`) with its log beside the checkpoints; a stage whose
manifest is already there is kept, and an interrupted one resumes from its own last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from labkit.core.artifacts import ARTIFACTS, MANIFEST
from labkit.core.atomic import write_text
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import CHECKPOINTS_ENV, project_root
from labkit.core.presets import get_preset
from labkit.data.storystream_mini import ensure_dataset
from labkit.experiments.sink_emergence import EMERGENCE_RUNS, REFERENCE_RUNS, merge_runs, reference_run
from labkit.report import scheduler
from labkit.report.executors import thread_environment
from labkit.training.common import StageRun
from labkit.training.registry import TRAINERS

SINK_PARTS = ".sink_emergence"  # one file per sink-emergence run, merged into sink_emergence.json at the end

STAGE_THREADS = 1  # threads each retrained stage uses, whatever the machine has


@dataclass(frozen=True)
class Job:
    """One stage to train: its name (the artifact folder) and the stages whose artifacts it reads."""

    name: str
    needs: tuple[str, ...] = ()


def retrain_jobs(schedule: str = "reference", full_study: bool = False) -> list[Job]:
    """The stages in the order they are started when ready (longest chain first: tokenizer -> MLLM -> stage 3)."""
    jobs = [Job(kind.name, kind.needs) for kind in ARTIFACTS.values()]
    if schedule == "reference":  # the study has no quick form; notebook 05 reads the committed one otherwise
        runs = range(len(REFERENCE_RUNS)) if full_study else EMERGENCE_RUNS
        jobs += [Job(f"sink_emergence_{index}") for index in runs]
    return jobs


def train_one(
    name: str, folder: Path, preset: str, schedule: str, progress: bool = True, steps: int | None = None
) -> None:
    """Train the one stage `name` into `folder / name` (what each process of `retrain_all` runs); `steps` cuts
    its schedule (`Schedule.with_steps`). The device is `$LABKIT_DEVICE` (`labkit report --device`)."""
    out = folder / name
    if (part := _study_part(folder, name)) is not None:
        write_text(part, json.dumps(reference_run(int(name.rsplit("_", 1)[1]), progress=progress)) + "\n")
        return
    TRAINERS[name](StageRun(get_preset(preset), schedule, steps=steps, out=out, progress=progress))


def parse_steps(text: str | None) -> dict[str, int]:
    """`--retrain-steps`: `STAGE=N,...` (stages named as in ARTIFACTS) -> {stage: steps}; `N` alone: every stage."""
    if not text:
        return {}
    if text.strip().isdigit():
        return dict.fromkeys(ARTIFACTS, int(text))
    steps = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        name = name.strip()
        if name not in ARTIFACTS or not count.strip().isdigit() or int(count) < 1:
            raise ParameterError(
                "--retrain-steps", f"{item!r}: expected STAGE=N with N >= 1 and STAGE one of {', '.join(ARTIFACTS)}"
            )
        steps[name] = int(count)
    return steps


def _study_part(folder: Path, name: str) -> Path | None:
    """Where the sink-emergence job `name` writes its run; None for a training stage."""
    return folder / SINK_PARTS / f"{name}.json" if name.startswith("sink_emergence_") else None


def is_done(job: Job, folder: Path) -> bool:
    """Whether an earlier run already finished this stage (its manifest or study part is there)."""
    part = _study_part(folder, job.name)
    return (part if part is not None else folder / job.name / MANIFEST).is_file()


def run_jobs(
    jobs: list[Job], command, folder: Path, slots: int = 2, env: dict | None = None, progress: bool = True, done=is_done
) -> dict[str, float]:
    """Run each job's `command(job)` (an argv) as a process once every job it needs has finished, at most `slots`
    at a time (`labkit.report.scheduler.schedule`); each process writes `folder/logs/<name>.log`. Return each job's
    wall seconds (0 for jobs found done). A failed job stops new starts; the running ones finish, then LabError
    names the failure and its log."""
    from tqdm.auto import tqdm

    names = {job.name for job in jobs}
    for job in jobs:
        if unknown := set(job.needs) - names:
            raise LabError(f"retrain: stage {job.name!r} needs unknown stages {sorted(unknown)}")
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    finished = {job.name: 0.0 for job in jobs if done(job, folder)}
    waiting = [job for job in jobs if job.name not in finished]
    index = {job.name: i for i, job in enumerate(waiting)}
    bar = tqdm(total=len(jobs), initial=len(finished), desc="retrain stages", disable=not progress)
    running: list[str] = []

    def execute(job: Job) -> float:
        start = time.perf_counter()
        with open(logs / f"{job.name}.log", "a", encoding="utf-8") as log:
            code = subprocess.run(command(job), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            raise LabError(f"retrain: stage {job.name} failed; see {logs / (job.name + '.log')}")
        return round(time.perf_counter() - start, 1)

    def started(job: Job) -> None:
        running.append(job.name)
        bar.set_postfix_str(", ".join(running))  # only on change: the bar may be going to a log file

    def ended(job: Job, seconds: float) -> None:
        running.remove(job.name)
        bar.set_postfix_str(", ".join(running), refresh=False)
        bar.update(1)

    try:
        seconds = scheduler.schedule(
            waiting,
            execute,
            slots,
            on_start=started,
            on_finish=ended,
            needs=lambda job: [index[need] for need in job.needs if need not in finished],
        )
    except LabError as error:
        raise LabError(str(error) if str(error).startswith("retrain:") else f"retrain: {error}") from None
    finally:
        bar.close()
    return {**finished, **{job.name: s for job, s in zip(waiting, seconds)}}


def retrain_all(
    preset: str,
    folder: Path | str,
    progress: bool = True,
    schedule: str = "reference",
    slots: int | None = None,
    full_study: bool = False,
    stages: Sequence[str] | None = None,
    steps: dict[str, int] | None = None,
) -> dict[str, float]:
    """Train every reference checkpoint into `folder`, independent stages side by side; return each stage's
    wall seconds, plus `"total"` (the wall time of the whole graph).

    `schedule="quick"` runs the same graph with the quick schedules (minutes, not hours): a check that the whole
    from-scratch path works, not a reproduction of the reference numbers. The sink-emergence study retrains the
    two runs in which a sink grows; `full_study=True` adds the three runs that show none (about 60 more minutes).
    `stages` retrains only the stages named; the others, and the sink-emergence study, are copied from the
    committed references (`keep_committed`). `steps` cuts the named stages' schedules (`parse_steps`): how
    `benchmarks/gpu_small_pipeline.sh` sizes the small preset's chain to minutes."""
    folder = Path(folder).resolve()
    ensure_dataset(get_preset(preset), progress)  # made once here, not by two processes at the same time
    slots = slots or min(2, os.cpu_count() or 1)
    # One thread per stage on every machine: the committed references were made so, and the thread count changes
    # floating-point sums (a 16-core machine giving each stage 8 threads would not reproduce them).
    env = {**os.environ, CHECKPOINTS_ENV: str(folder), **thread_environment(STAGE_THREADS)}
    os.environ[CHECKPOINTS_ENV] = str(folder)  # the report that follows reads the retrained stages too

    def command(job: Job) -> list[str]:
        count = (steps or {}).get(job.name)
        return [
            sys.executable,
            "-m",
            "labkit.report.retrain",
            job.name,
            str(folder),
            preset,
            schedule,
            str(count or ""),
        ]

    start = time.perf_counter()
    jobs = retrain_jobs(schedule, full_study)
    if stages is not None:
        keep_committed(folder, preset, stages)
        jobs = [job for job in jobs if job.name in ARTIFACTS]  # copied stages count as done; the study is copied
    seconds = run_jobs(jobs, command, folder, slots, env, progress)
    seconds["total"] = round(time.perf_counter() - start, 1)
    parts = sorted((folder / SINK_PARTS).glob("*.json"))
    if parts:
        study = merge_runs([json.loads(part.read_text(encoding="utf-8")) for part in parts])
        write_text(folder / "sink_emergence.json", json.dumps(study, indent=1) + "\n")
    write_text(folder / "retrain_seconds.json", json.dumps(seconds, indent=1) + "\n")
    return seconds


def keep_committed(folder: Path, preset: str, stages: Sequence[str]) -> list[str]:
    """Copy every committed stage except `stages` into `folder`, and the committed sink-emergence study, so that
    a retrain trains only `stages` (and reads the committed versions of what they need). Returns the stages
    copied. A stage already in `folder` is left as it is."""
    if unknown := sorted(set(stages) - set(ARTIFACTS)):
        raise ParameterError("retrain-stages", f"unknown stages {unknown}; choose from {', '.join(ARTIFACTS)}")
    committed = project_root() / "checkpoints" / preset  # not checkpoints_folder: a retrain points it here
    copied = []
    for name in ARTIFACTS:
        if name in stages or (folder / name).exists():
            continue
        if not (committed / name / MANIFEST).is_file():
            raise LabError(f"retrain: no committed {name} in {committed} to keep; retrain it too")
        shutil.copytree(committed / name, folder / name)
        copied.append(name)
    study = committed / "sink_emergence.json"
    if study.is_file() and not (folder / study.name).exists():
        shutil.copy2(study, folder / study.name)
    return copied


# How far a retrained report may stand from the committed one and still count as reproducing it (set before the
# first reference retrain was measured). With the same thread count per stage on the same kind of machine, a
# retrain is byte-identical (reports/tiny-retrain-check). Another thread count changes float rounding, and 6000
# diffusion steps amplify it well past these bounds (reports/tiny-retrain-check/against-two-thread-references).
TOLERANCE = {
    "fid": ("relative", 0.20),
    "clip": ("absolute", 0.05),
    "char_acc": ("absolute", 0.15),
    "style_consistency": ("absolute", 0.10),
    "lpips": ("absolute", 0.05),
}


def compare_reports(committed: Path | str, retrained: Path | str) -> dict[str, dict[str, float]]:
    """Per grid cell present in both reports, each overall metric's difference (retrained - committed)."""
    first = {r["run"]: r for r in json.loads(Path(committed).read_text(encoding="utf-8"))["runs"] if "metrics" in r}
    second = {r["run"]: r for r in json.loads(Path(retrained).read_text(encoding="utf-8"))["runs"] if "metrics" in r}
    out = {}
    for run in sorted(first.keys() & second.keys()):
        a, b = first[run]["metrics"]["overall"], second[run]["metrics"]["overall"]
        out[run] = {k: b[k] - a[k] for k in a if isinstance(a[k], (int, float)) and isinstance(b.get(k), (int, float))}
    return out


def _numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed by their dotted path."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def compare_checkpoints(committed: Path | str, retrained: Path | str) -> dict[str, dict[str, tuple[float, float]]]:
    """Per stage present in both folders, each manifest metric as (committed, retrained), plus the sink-emergence
    settings' strongest-head BOS ratio: what a reader checks to see that retraining reproduced the checkpoints."""
    committed, retrained = Path(committed), Path(retrained)
    out = {}
    for manifest in sorted(retrained.glob(f"*/{MANIFEST}")):
        other = committed / manifest.parent.name / MANIFEST
        if other.is_file():
            a = _numbers(json.loads(other.read_text(encoding="utf-8")).get("metrics", {}))
            b = _numbers(json.loads(manifest.read_text(encoding="utf-8")).get("metrics", {}))
            out[manifest.parent.name] = {key: (a[key], b[key]) for key in a if key in b}
    study_a, study_b = committed / "sink_emergence.json", retrained / "sink_emergence.json"
    if study_a.is_file() and study_b.is_file():
        a, b = (json.loads(f.read_text(encoding="utf-8"))["settings"] for f in (study_a, study_b))
        out["sink_emergence"] = {
            f"{name}.{key}": (a[name][key], b[name][key])
            for name in b
            if name in a
            for key in ("max_bos_ratio", "max_bos_ratio_head")
            if key in a[name] and key in b[name]
        }
    return out


def compare_weights(committed: Path | str, retrained: Path | str) -> dict[str, bool]:
    """Per stage retrained, whether every weight file (`*.safetensors`) is byte-for-byte the committed one: the
    strongest form of reproduction, reached when both were trained with the same thread count (float rounding
    depends on how a reduction is split between threads)."""
    committed, retrained = Path(committed), Path(retrained)
    out = {}
    for manifest in sorted(retrained.glob(f"*/{MANIFEST}")):
        stage_a, stage_b = committed / manifest.parent.name, manifest.parent
        files_a = {p.relative_to(stage_a) for p in stage_a.rglob("*.safetensors")}
        files_b = {p.relative_to(stage_b) for p in stage_b.rglob("*.safetensors")}
        out[stage_b.name] = (
            files_a == files_b
            and bool(files_a)
            and all((stage_a / f).read_bytes() == (stage_b / f).read_bytes() for f in files_a)
        )
    return out


def outside_tolerance(committed: Path | str, retrained: Path | str) -> list[str]:
    """The (cell, metric) pairs of `compare_reports` that TOLERANCE does not allow, as readable lines."""
    values = {
        r["run"]: r["metrics"]["overall"]
        for r in json.loads(Path(committed).read_text(encoding="utf-8"))["runs"]
        if "metrics" in r
    }
    lines = []
    for run, deltas in compare_reports(committed, retrained).items():
        for metric, delta in deltas.items():
            if metric not in TOLERANCE:
                continue
            kind, bound = TOLERANCE[metric]
            allowed = bound * abs(values[run][metric]) if kind == "relative" else bound
            if abs(delta) > allowed:
                lines.append(f"{run}: {metric} differs by {delta:+.3f} (allowed ±{allowed:.3f})")
    return lines


def write_comparison(preset: str, retrained_report: Path, retrained_folder: Path) -> dict:
    """Committed vs retrained (weights byte for byte, checkpoint metrics, per-cell metric differences, what
    TOLERANCE does not allow), written to `retrained_report/comparison.json` and returned."""
    committed_report = project_root() / "reports" / preset / "summary.json"
    seconds = retrained_folder / "retrain_seconds.json"
    comparison = {
        "retrain_seconds": json.loads(seconds.read_text(encoding="utf-8")) if seconds.is_file() else None,
        "tolerance": TOLERANCE,
        "identical_weights": compare_weights(project_root() / "checkpoints" / preset, retrained_folder),
        "checkpoints": compare_checkpoints(project_root() / "checkpoints" / preset, retrained_folder),
        "cells": compare_reports(committed_report, retrained_report / "summary.json"),
        "outside_tolerance": outside_tolerance(committed_report, retrained_report / "summary.json"),
    }
    write_text(retrained_report / "comparison.json", json.dumps(comparison, indent=1) + "\n")
    return comparison


if __name__ == "__main__":  # one stage of retrain_all, in its own process
    import torch

    stage, target, preset_name, schedule_name, count = (sys.argv[1:6] + [""])[:5]
    torch.set_num_threads(STAGE_THREADS)
    train_one(stage, Path(target), preset_name, schedule_name, progress=True, steps=int(count) if count else None)
