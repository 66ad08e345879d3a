"""`labkit report --retrain`: every reference checkpoint trained again from scratch (issue 6).

The committed checkpoints under `checkpoints/<preset>/` were made by the same functions with the `reference`
schedule; retraining them all (about 90 CPU minutes at tiny) shows the report does not depend on anything the
repository merely ships. The retrained checkpoints go to a separate folder (never over the committed ones), and
the `LABKIT_CHECKPOINTS` environment variable points every later stage, and every notebook papermill starts, at
them. Each stage resumes from its own last checkpoint when interrupted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .stages import CHECKPOINTS_ENV


def retrain_all(preset: str, folder: Path | str, progress: bool = True) -> dict[str, float]:
    """Train every reference checkpoint into `folder`, in stage order; return each stage's wall seconds."""
    from .atomic import write_text
    from .sink_emergence import reference_study
    from .stages.stage0 import train_judges, train_stage0
    from .stages.stage1 import train_stage1, train_vae
    from .stages.stage2 import train_stage2
    from .stages.stage3 import train_stage3

    folder = Path(folder).resolve()
    os.environ[CHECKPOINTS_ENV] = str(folder)  # from here on, locate_artifact finds the retrained stages first
    stages = [
        ("visual_tokenizer", lambda: train_stage0(preset, "reference", progress=progress)),
        ("judges", lambda: train_judges(preset, "reference", progress=progress)),
        ("mllm", lambda: train_stage2(preset, "reference", progress=progress)),
        ("vae", lambda: train_vae(preset, "reference", progress=progress)),
        ("detokenizer", lambda: train_stage1(preset, "reference", progress=progress)),
        ("detokenizer_official", lambda: train_stage3(preset, "reference", mode="official", progress=progress)),
        ("detokenizer_full", lambda: train_stage3(preset, "reference", mode="full", progress=progress)),
        ("sink_emergence", lambda: write_text(folder / "sink_emergence.json",
                                              json.dumps(reference_study(progress=progress), indent=1) + "\n")),
    ]
    seconds = {}
    for name, train in stages:
        start = time.perf_counter()
        train()
        seconds[name] = round(time.perf_counter() - start, 1)
    write_text(folder / "retrain_seconds.json", json.dumps(seconds, indent=1) + "\n")
    return seconds
