"""`labkit report --retrain`: every reference checkpoint trained again from scratch (issue 6).

The committed checkpoints under `checkpoints/<preset>/` were made by the same functions with the `reference`
schedule; retraining them all (about 200 CPU minutes at tiny, half of it the sink-emergence study) shows the
report does not depend on anything the repository merely ships. The retrained checkpoints go to a separate
folder (never over the committed ones), and the `LABKIT_CHECKPOINTS` environment variable points every later
stage, and every notebook papermill starts, at them. Each stage resumes from its own last checkpoint when
interrupted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .stages import CHECKPOINTS_ENV


def retrain_all(preset: str, folder: Path | str, progress: bool = True, schedule: str = "reference") -> dict[str, float]:
    """Train every reference checkpoint into `folder`, in stage order; return each stage's wall seconds.

    `schedule="quick"` runs the same chain with the quick schedules (minutes, not hours): a check that the
    whole from-scratch path works, not a reproduction of the reference numbers."""
    from .atomic import write_text
    from .sink_emergence import reference_study
    from .stages.stage0 import train_judges, train_stage0
    from .stages.stage1 import train_stage1, train_vae
    from .stages.stage2 import train_stage2
    from .stages.stage3 import train_stage3

    folder = Path(folder).resolve()
    os.environ[CHECKPOINTS_ENV] = str(folder)  # from here on, locate_artifact finds the retrained stages first
    stages = [
        ("visual_tokenizer", lambda out: train_stage0(preset, schedule, out=out, progress=progress)),
        ("judges", lambda out: train_judges(preset, schedule, out=out, progress=progress)),
        ("mllm", lambda out: train_stage2(preset, schedule, out=out, progress=progress)),
        ("vae", lambda out: train_vae(preset, schedule, out=out, progress=progress)),
        ("detokenizer", lambda out: train_stage1(preset, schedule, out=out, progress=progress)),
        ("detokenizer_official", lambda out: train_stage3(preset, schedule, mode="official", out=out, progress=progress)),
        ("detokenizer_full", lambda out: train_stage3(preset, schedule, mode="full", out=out, progress=progress)),
    ]
    if schedule == "reference":  # the study has no quick form; notebook 05 reads the committed one otherwise
        stages.append(("sink_emergence", lambda out: write_text(out.with_suffix(".json"),
                                                                json.dumps(reference_study(progress=progress), indent=1) + "\n")))
    seconds = {}
    for name, train in stages:
        start = time.perf_counter()
        train(folder / name)  # every stage writes into `folder`, where locate_artifact now looks first
        seconds[name] = round(time.perf_counter() - start, 1)
    write_text(folder / "retrain_seconds.json", json.dumps(seconds, indent=1) + "\n")
    return seconds


def compare_reports(committed: Path | str, retrained: Path | str) -> dict[str, dict[str, float]]:
    """Per grid cell present in both reports, each overall metric's difference (retrained - committed)."""
    first = {r["run"]: r for r in json.loads(Path(committed).read_text(encoding="utf-8"))["runs"] if "metrics" in r}
    second = {r["run"]: r for r in json.loads(Path(retrained).read_text(encoding="utf-8"))["runs"] if "metrics" in r}
    out = {}
    for run in sorted(first.keys() & second.keys()):
        a, b = first[run]["metrics"]["overall"], second[run]["metrics"]["overall"]
        out[run] = {k: b[k] - a[k] for k in a if isinstance(a[k], (int, float)) and isinstance(b.get(k), (int, float))}
    return out
