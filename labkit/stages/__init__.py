"""Training stages, as in the paper (stage 1 de-tokenizer, stage 2 MLLM, stage 3 adaptation), plus stage 0.

Stage 0 exists only in the lab: the paper reads images through a pretrained Qwen-VL ViT-bigG and scores them with
pretrained networks; at `tiny` neither exists, so stage 0 trains a visual tokenizer and the judges.

Every stage writes an artifact folder (weights + manifest). A reference checkpoint, committed under
`checkpoints/<preset>/<name>`, wins over a `quick` one trained locally under `artifacts/<preset>/quick/<name>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..training import Schedule

from ..artifacts import MANIFEST
from ..atomic import write_text


CHECKPOINTS_ENV = "LABKIT_CHECKPOINTS"


def checkpoints_folder(preset: str) -> Path:
    """Where reference checkpoints live: checkpoints/<preset>/, or the folder the LABKIT_CHECKPOINTS environment
    variable names (`labkit report --retrain` sets it, so the notebooks papermill starts use the retrained ones)."""
    import os

    from ..report import project_root

    override = os.environ.get(CHECKPOINTS_ENV)
    return Path(override) if override else project_root() / "checkpoints" / preset


def locate_artifact(name: str, preset: str) -> Path | None:
    """The reference checkpoint <checkpoints_folder>/<name> if present, else artifacts/<preset>/quick/<name>, else None."""
    from ..report import project_root

    root = project_root()
    for folder in (checkpoints_folder(preset) / name, root / "artifacts" / preset / "quick" / name):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def artifact_folders(preset: str, name: str, schedule: str, out: Path | str | None) -> tuple[Path, Path]:
    """(artifact folder, training work folder). Work folders never go into checkpoints/, which is committed."""
    from ..report import artifacts_folder

    if out is not None:
        out = Path(out)
        return out, out.with_name(f".{out.name}.run")
    default = checkpoints_folder(preset) / name if schedule == "reference" else artifacts_folder(preset) / "quick" / name
    return default, artifacts_folder(preset) / "runs" / f"{name}-{schedule}"


def prepare_workdir(workdir: Path, run: dict, resume: bool) -> None:
    """Resume only a run with the very same settings; anything else starts from scratch."""
    stamp, text = workdir / "run.json", json.dumps(run, sort_keys=True, default=str)
    if workdir.exists() and (not resume or not stamp.is_file() or stamp.read_text(encoding="utf-8") != text):
        shutil.rmtree(workdir)
    write_text(stamp, text)


def step_generator(seed: int, step: int) -> "torch.Generator":
    """The random numbers of step `step`: a pure function of (seed, step), so a resumed run sees the same batches."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def base_manifest(preset: str, schedule: str, plan: Schedule, seed: int, data_root: Path, call: str) -> dict:
    """The fields every stage's manifest starts with (what ran, on what, with which code and packages)."""
    from dataclasses import asdict

    from ..artifacts import command_line
    from ..doctor import package_versions
    from ..report import git_commit, portable_path

    return {"preset": preset, "schedule": schedule, "schedule_settings": asdict(plan), "seed": seed,
            "git_commit": git_commit(), "packages": package_versions(), "command": call, "argv": command_line(),
            "data": portable_path(data_root)}
