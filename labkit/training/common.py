"""Training stages, as in the paper (stage 1 de-tokenizer, stage 2 MLLM, stage 3 adaptation), plus stage 0.

Stage 0 exists only in the lab: the paper reads images through a pretrained Qwen-VL ViT-bigG and scores them with
pretrained networks; at `tiny` neither exists, so stage 0 trains a visual tokenizer and the judges.

Every stage writes an artifact folder (weights + manifest). A reference checkpoint, committed under
`checkpoints/<preset>/<name>`, wins over a `quick` one trained locally under `artifacts/<preset>/quick/<name>`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from labkit.core.artifacts import build_command
from labkit.core.atomic import write_text
from labkit.core.devices import default_device, mixed_precision, resolve_device
from labkit.core.errors import ParameterError
from labkit.core.paths import artifacts_folder, checkpoints_folder, portable_path, quick_folder
from labkit.core.presets import Preset
from labkit.core.provenance import command_line, git_commit, package_versions
from labkit.data.storystream_mini import ensure_dataset
from labkit.training.loop import Schedule, TrainResult, pick_schedule, train

SCHEDULE_NAMES = ("quick", "reference")


@dataclass(frozen=True)
class StageRun:
    """What every stage's trainer is asked to do: one contract for `labkit train`, `--retrain`, notebooks and tests.

    A trainer is `train_<stage>(run, <its own options>)` and returns the artifact's manifest (or, when
    `stop_after` interrupts it, `{"interrupted_at": step, "workdir": ...}`)."""

    preset: Preset
    schedule: str = "quick"  # "quick" (minutes: notebooks, CI) or "reference" (what made checkpoints/<preset>/)
    steps: int | None = None  # another number of steps than the schedule's (`Schedule.with_steps`)
    data_root: Path | str | None = None  # default: the preset's StoryStream-mini data set, made on first use
    out: Path | str | None = None  # the artifact folder; default: checkpoints/<preset>/<name> or artifacts/.../quick/
    resume: bool = True  # continue from the run's last checkpoint when its settings are the same
    progress: bool = True  # tqdm bars
    stop_after: int | None = None  # interrupt after this many steps (checkpoint written, no artifact): tests use it
    device: str | None = None  # "auto" (None: $LABKIT_DEVICE, else auto), "cpu" or "cuda" (`labkit.core.devices`)
    precision: str | None = None  # "auto" (None: bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"

    def __post_init__(self) -> None:
        if not isinstance(self.preset, Preset):
            raise ParameterError(
                "preset", f"must be a Preset (labkit.core.presets.get_preset(name)), got {self.preset!r}"
            )
        if self.schedule not in SCHEDULE_NAMES:
            raise ParameterError(
                "--schedule", f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}"
            )

    def plan(self, table: dict[str, Schedule], steps: int | None = None) -> Schedule:
        """This run's schedule from a stage's table (`steps` overrides `self.steps`, for a stage's second model)."""
        plan = pick_schedule(table, self.schedule, steps if steps is not None else self.steps)
        return replace(plan, mixed_precision=mixed_precision(self.torch_device(), self.precision))

    def torch_device(self) -> torch.device:
        """The device this run trains on (a ParameterError naming --device for `cuda` without a GPU)."""
        return resolve_device(self.device) if self.device is not None else default_device()

    def data(self) -> Path:
        return Path(self.data_root) if self.data_root else ensure_dataset(self.preset, self.progress)

    def folders(self, name: str) -> tuple[Path, Path]:
        """(artifact folder, training work folder) of the artifact `name`."""
        return artifact_folders(self.preset.name, name, self.schedule, self.out)

    def fit(
        self,
        model,
        make_batch,
        loss_fn,
        plan: Schedule,
        workdir: Path,
        evaluate=None,
        desc: str = "",
        shardable: bool = False,
    ) -> TrainResult:
        """`labkit.training.loop.train` with this run's resume, progress and interruption settings."""
        return train(
            model,
            make_batch,
            loss_fn,
            plan,
            workdir,
            evaluate=evaluate,
            resume=self.resume,
            progress=self.progress,
            desc=desc,
            stop_after=self.stop_after,
            device=self.torch_device(),
            shardable=shardable,
        )

    def interrupted(self, plan: Schedule) -> bool:
        """Whether `stop_after` cut the run short (a checkpoint is written, no artifact)."""
        return self.stop_after is not None and self.stop_after < plan.steps

    def command(self, name: str) -> str:
        """The `labkit train` command that makes this artifact (recorded in its manifest)."""
        command = build_command(name, self.preset.name, self.schedule)
        return command + (f" --steps {self.steps}" if self.steps is not None else "")


def artifact_folders(preset: str, name: str, schedule: str, out: Path | str | None) -> tuple[Path, Path]:
    """(artifact folder, training work folder). Work folders never go into checkpoints/, which is committed."""
    if out is not None:
        out = Path(out)
        return out, out.with_name(f".{out.name}.run")
    default = checkpoints_folder(preset) / name if schedule == "reference" else quick_folder(preset) / name
    return default, artifacts_folder(preset) / "runs" / f"{name}-{schedule}"


def prepare_workdir(workdir: Path, run: dict, resume: bool) -> None:
    """Resume only a run with the very same settings; anything else starts from scratch."""
    stamp, text = workdir / "run.json", json.dumps(run, sort_keys=True, default=str)
    if workdir.exists() and (not resume or not stamp.is_file() or stamp.read_text(encoding="utf-8") != text):
        shutil.rmtree(workdir)
    write_text(stamp, text)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random numbers of step `step`: a pure function of (seed, step), so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def base_manifest(run: StageRun, name: str, plan: Schedule, seed: int, data_root: Path) -> dict:
    """The fields every stage's manifest starts with (what ran, on what, with which code and packages)."""
    preset, schedule, call = run.preset.name, run.schedule, run.command(name)
    return {
        "preset": preset,
        "schedule": schedule,
        "schedule_settings": asdict(plan),
        "seed": seed,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "command": call,
        "argv": command_line(),
        "data": portable_path(data_root),
    }


def thin(history: list[dict], points: int = 100) -> list[dict]:
    """About `points` loss entries and every evaluation entry, rounded, for the manifest."""
    stride = max(1, len(history) // points)
    kept = [h for i, h in enumerate(history) if i % stride == 0 or len(h) > 3 or i == len(history) - 1]
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in kept]


def run_manifest(start: float, result: TrainResult, metrics: dict) -> dict:
    """The fields a de-tokenizer stage's manifest ends with: how long it took, where it resumed, what it measured."""
    return {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "metrics": metrics,
        "history": thin(result.history),
    }
