"""Which device a stage, a notebook or the report runs on, and the precision that goes with it.

`auto` (the default everywhere) is CUDA when torch sees a GPU, else the CPU; `cpu` and `cuda` force one. To pick
one GPU of several, set `CUDA_VISIBLE_DEVICES` (Accelerate gives each process of a multi-GPU launch its own).
`labkit report --device` and `--retrain` hand the choice to every notebook kernel and every stage process through
the `LABKIT_DEVICE` environment variable, which `default_device` reads.

Precision: on CUDA the training steps run under bf16 autocast (`torch.autocast`, through Accelerate's
`mixed_precision="bf16"`), as the official scripts train (`scripts/sft_*.sh`: bf16 with DeepSpeed); the weights, the
optimizer states and the losses stay fp32 (autocast computes softmax, log-softmax, cross-entropy and norms in fp32).
On the CPU everything is fp32, so a CPU run is exactly reproducible (README, "Reproducibility"). Where bf16 is not
safe, the lab does not use it, on any device:
- evaluation and metrics (validation losses, FID-analogue covariances, LPIPS, judge accuracies) run in fp32: an
  8-bit mantissa moves a metric by more than the differences the report tests;
- KV caches and RoPE re-rotation at generation run in the model's dtype (fp32 at tiny and small): re-rotating a
  kept key in bf16 adds an error at every eviction, and a 100-segment story evicts hundreds of times;
- the VAE decodes in fp32 (diffusers' SDXL VAE overflows in fp16; bf16 keeps the range but loses the detail that
  LPIPS scores).
"""

from __future__ import annotations

import os

import torch

from labkit.core.errors import ParameterError

DEVICE_ENV = "LABKIT_DEVICE"
PRECISION_ENV = "LABKIT_PRECISION"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


def resolve_device(name: str | None = None, parameter: str = "--device") -> torch.device:
    """`auto`/None -> CUDA if available else CPU; `cpu`; `cuda` (a ParameterError when torch sees no GPU)."""
    name = (name or "auto").strip().lower()
    if name not in DEVICE_CHOICES:
        raise ParameterError(parameter, f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParameterError(
            parameter,
            "cuda was asked for but torch sees no GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu or auto",
        )
    return torch.device(name)


def default_device() -> torch.device:
    """The device chosen for this process: `$LABKIT_DEVICE` (set by `labkit report --device`), else `auto`."""
    return resolve_device(os.environ.get(DEVICE_ENV), parameter=f"${DEVICE_ENV}")


def mixed_precision(device: torch.device, precision: str | None = None) -> str:
    """Accelerate's `mixed_precision` for training on `device`: "bf16" (autocast) or "no" (fp32).

    `auto` (None: `$LABKIT_PRECISION`, else auto): bf16 on a CUDA GPU that supports it, fp32 elsewhere. `bf16` is
    allowed on the CPU too (CPU autocast), which is how the CPU tests exercise the bf16 path."""
    precision = (precision or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if precision not in PRECISION_CHOICES:
        raise ParameterError(
            "--precision", f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}"
        )
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if precision == "bf16" else "no"


def choose_for_children(device: str | None, precision: str | None) -> None:
    """Check `--device`/`--precision` now (a ParameterError before any work) and hand them to every process this
    one starts (notebook kernels, retrained stages) through the environment."""
    resolve_device(device)
    mixed_precision(torch.device("cpu"), precision)
    if device is not None:
        os.environ[DEVICE_ENV] = device
    if precision is not None:
        os.environ[PRECISION_ENV] = precision


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def to_module_device(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on `module`'s device: evaluation helpers take CPU data and work with a model wherever it is."""
    return tensor.to(module_device(module))
