"""One training loop for every stage, through Hugging Face Accelerate.

What a student sees: a tqdm bar with the loss. What it guarantees:
- the batch of step t is a pure function of (seed, t), and Accelerate's checkpoint holds model, optimizer,
  scheduler and RNG states, so a run killed at any point and resumed ends where an uninterrupted run ends;
- checkpoints are written to a temporary folder and renamed into place: never half-written;
- the same code runs single-process on a CPU or a GPU, or multi-process (`torchrun --nproc_per_node 2` on a CPU,
  where `accelerate launch --cpu` without mpirun starts one process; `accelerate launch --config_file
  configs/accelerate/...` on GPUs), each process taking its share of the step's batch;
- batches are built on the CPU (a pure function of the step) and sent to the device here, so a stage's
  `make_batch` never has to know where the model is; on CUDA the step runs under bf16 autocast and evaluation in
  fp32 (`labkit.core.devices`).

The learning-rate schedule is the official one (`src/train/schedular.py`): linear warm-up, then cosine decay
to a floor of `min_lr_ratio` times the peak.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from labkit.core.atomic import replace_directory, write_text
from labkit.core.devices import default_device
from labkit.core.errors import ParameterError
from labkit.training.sharding import full_parameters, refuse_unsupported_fsdp

CHECKPOINT = "checkpoint"
STATE = "trainer_state.json"
THROUGHPUT = "throughput.json"  # device, precision, steps/s, tokens/s, peak GPU memory of the last run (workdir)


@dataclass(frozen=True)
class Schedule:
    """How long and how hard a stage trains (a `quick` or `reference` schedule of a preset)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup: int = 20
    min_lr_ratio: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)  # stage 2's AdamW betas and eps, as the official script
    eps: float = 1e-6
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 100
    # "bf16" autocasts; "no" keeps fp32 (exactly reproducible on CPU). Set by `StageRun.plan` from the device.
    mixed_precision: str = "no"

    def with_steps(self, steps: int | None) -> Schedule:
        """The one rule for `--steps`: this schedule cut (or stretched) to `steps`, warm-up at most a tenth of it,
        one evaluation at the end, checkpoints no rarer than before. `None` keeps the schedule as it is."""
        if steps is None:
            return self
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ParameterError("--steps", f"must be an int >= 1 (got {steps!r})")
        return replace(
            self,
            steps=steps,
            warmup=min(self.warmup, max(1, steps // 10)),
            eval_every=steps,
            checkpoint_every=max(1, min(self.checkpoint_every, steps)),
        )


def pick_schedule(table: dict[str, Schedule], name: str, steps: int | None = None) -> Schedule:
    """A stage's `quick` or `reference` schedule, optionally with another number of steps."""
    if name not in table:
        raise ParameterError("--schedule", f"unknown schedule {name!r}; choose one of {', '.join(table)}")
    return table[name].with_steps(steps)


def cosine_with_floor(schedule: Schedule) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / max(1, schedule.warmup)
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_rows(batch_size: int, accelerator: Accelerator) -> range:
    """The rows of a global batch this process trains on (all of them in a single process)."""
    return range(accelerator.process_index, batch_size, accelerator.num_processes)


@dataclass
class TrainResult:
    history: list[dict]  # one entry per logged step: step, loss, lr, plus evaluation metrics when evaluated
    final_metrics: dict
    resumed_from: int  # 0 for a fresh run
    seconds: float
    is_main_process: bool = True  # in a multi-process run only the main process writes artifacts


def train(
    model: torch.nn.Module,
    make_batch: Callable[[int, range], Any],
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]],
    schedule: Schedule,
    workdir: Path | str,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = True,
    progress: bool = True,
    desc: str = "train",
    accelerator: Accelerator | None = None,
    stop_after: int | None = None,
    device: torch.device | None = None,
    shardable: bool = False,
) -> TrainResult:
    """Train `model` for `schedule.steps` steps; `make_batch(step, rows)` builds the rows of step `step`.

    `device`: where to train (default `labkit.core.devices.default_device()`); the precision is the schedule's.
    `stop_after` ends the run early (after that many steps in total, checkpoint written) - tests use it to
    simulate an interruption. `shardable`: the caller gathers FSDP's shards after training for what it evaluates
    and saves (`labkit.training.sharding`); any other run is refused under FSDP.
    """
    refuse_unsupported_fsdp(desc, supported=shardable)
    workdir = Path(workdir)
    device = device or default_device()
    accelerator = accelerator or _accelerator(device, schedule.mixed_precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=schedule.lr, betas=schedule.betas, eps=schedule.eps, weight_decay=schedule.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_floor(schedule))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step, history = 0, []
    checkpoint = workdir / CHECKPOINT
    if resume and (checkpoint / STATE).is_file():
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE).read_text(encoding="utf-8"))
        start_step, history = state["step"], state["history"]
    begin = time.perf_counter()
    rows = batch_rows(schedule.batch_size, accelerator)
    last = schedule.steps if stop_after is None else min(schedule.steps, stop_after)
    bar = tqdm(
        range(start_step, last),
        desc=desc,
        unit="step",
        disable=not progress or not accelerator.is_main_process,
        initial=start_step,
        total=schedule.steps,
    )
    tokens = 0
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    for step in bar:
        model.train()
        batch = send_to_device(make_batch(step, rows), accelerator.device)
        tokens += _token_count(batch)
        with accelerator.autocast():
            loss, logs = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if schedule.grad_clip:
            accelerator.clip_grad_norm_(trainable, schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        entry = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "lr": scheduler.get_last_lr()[0],
            **{k: float(v) for k, v in logs.items()},
        }
        done = step + 1
        if evaluate is not None and (done % schedule.eval_every == 0 or done == schedule.steps):
            entry.update(_evaluate(model, evaluate, accelerator))
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")
        if done % schedule.checkpoint_every == 0 or done == last:
            _save_checkpoint(accelerator, checkpoint, {"step": done, "history": history})
    bar.close()
    seconds = time.perf_counter() - begin
    if accelerator.is_main_process:
        _write_throughput(workdir / THROUGHPUT, accelerator, schedule, last - start_step, tokens, seconds)
    final = {k: v for k, v in history[-1].items() if k not in ("step", "lr")} if history else {}
    return TrainResult(history, final, start_step, seconds, accelerator.is_main_process)


def _accelerator(device: torch.device, mixed_precision: str) -> Accelerator:
    """An Accelerator for `device` and `mixed_precision`. Accelerate keeps one state per process and refuses another
    precision once it is set; a kernel that trains in fp32 and then in bf16 (a notebook, the tests) would fail,
    so a single-process state of another precision is reset. A multi-process state is never touched (one run
    there has one precision)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def _token_count(batch: Any) -> int:
    """Token positions this process trains on in a step: an MLLM batch's `input_ids`, an LM batch of ids; 0 for
    image batches (their throughput is steps/s)."""
    ids = getattr(batch, "input_ids", batch)
    return ids.numel() if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.ndim == 2 else 0


def _write_throughput(
    path: Path, accelerator: Accelerator, schedule: Schedule, steps: int, tokens: int, seconds: float
) -> None:
    """What `benchmarks/gpu_small_pipeline.sh` reports per stage (tokens counted on the main process, times the
    number of processes)."""
    cuda = accelerator.device.type == "cuda"
    record = {
        "device": torch.cuda.get_device_name(accelerator.device) if cuda else "cpu",
        "processes": accelerator.num_processes,
        "mixed_precision": schedule.mixed_precision,
        "batch_size": schedule.batch_size,
        "steps": steps,
        "seconds": round(seconds, 2),
        "steps_per_second": round(steps / seconds, 3) if seconds > 0 else None,
        "tokens_per_second": round(tokens * accelerator.num_processes / seconds, 1) if seconds > 0 and tokens else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3) if cuda else None,
    }
    write_text(path, json.dumps(record, indent=1) + "\n")


def _evaluate(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict], accelerator: Accelerator) -> dict:
    """Evaluation in fp32 whatever the training precision: metrics are compared across runs and devices. Under
    FSDP every process gathers the whole model first (`labkit.training.sharding`): evaluations call more than
    `forward`."""
    model.eval()
    with torch.no_grad(), full_parameters(model):
        metrics = evaluate(accelerator.unwrap_model(model))
    return {k: float(v) for k, v in metrics.items()}


def _save_checkpoint(accelerator: Accelerator, checkpoint: Path, state: dict) -> None:
    """Accelerate's full state plus our step counter, written beside and renamed over the old checkpoint.

    Every process calls `save_state` (each saves its own RNG state); only the main process renames.
    """
    tmp = checkpoint.with_name(f".{checkpoint.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text(tmp / STATE, json.dumps(state) + "\n")
            replace_directory(tmp, checkpoint)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
