"""Fully sharded data parallel (FSDP 2, `configs/accelerate/fsdp.yaml`): evaluating and saving a sharded model.

Under FSDP each process keeps only its shard of every parameter; a wrapped module gathers its parameters for its
own `forward` and frees them after. The lab's evaluations call more than `forward` (a de-tokenizer's `sample`, the
MLLM's attention-sink probes on `causal_lm`), and its artifacts are written from state dicts, so both need the whole
parameters:

- `full_parameters(model)`: every FSDP module of `model` gathers its parameters and keeps them, forward after forward,
  until the block ends (each process then holds the whole model once more: 27 GB at fp32 for Llama-2-7B, which
  `labkit.training.memory_plan` leaves out: it counts training only);
- `full_state_dict(model)`: the state dict with every shard gathered into a plain tensor. It is collective: every
  process must call it, and only the main process then writes.

Outside FSDP both are no-ops, so a stage calls them unconditionally. FSDP 1 (`fsdp_version: 1`) is refused: its
flat parameters cannot be gathered for calls other than `forward` (`summon_full_params` forbids forward inside).
Accelerate 1.16 enables FSDP for GPU processes only (`AcceleratorState`: multi-GPU types), so on a CPU these
functions are exercised on torch's own `fully_shard` over gloo (tests/training/test_sharding.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from labkit.core.errors import LabError


def sharded_modules(model: torch.nn.Module) -> list[FSDPModule]:
    """The FSDP 2 modules inside `model` (itself included), outermost first."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(sharded_modules(model))


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every FSDP module of `model` unsharded for the block, and kept so across forwards (FSDP would free a
    module's parameters after each forward); resharded afterwards. A no-op for a model that is not sharded."""
    modules = sharded_modules(model)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every sharded tensor gathered (on every process: a collective), detached."""
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach()
        for name, value in model.state_dict().items()
    }


def refuse_unsupported_fsdp(stage: str, supported: bool) -> None:
    """Before any work: refuse FSDP for a stage that does not gather its sharded parameters (`supported` False), and
    FSDP 1 everywhere."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1", "yes"):
        return
    if not supported:
        raise LabError(
            f"{stage} does not run under FSDP: only the paper preset's stage 2 gathers its sharded parameters for "
            "evaluation and saving (labkit.training.sharding). Use configs/accelerate/ddp.yaml or "
            "configs/accelerate/deepspeed_zero2.yaml"
        )
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise LabError(
            f"{stage}: FSDP 1 is not supported (its flat parameters cannot be gathered outside forward): set "
            "`fsdp_version: 2` in the Accelerate config, as configs/accelerate/fsdp.yaml does"
        )
