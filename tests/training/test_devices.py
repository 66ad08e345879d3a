"""`--device` and `--precision` (labkit.core.devices): how a device is chosen and checked, the precision that goes
with it, how the choice reaches the processes a command starts, and a stage trained under bf16 autocast (on the
CPU: the same autocast path CUDA takes, with CPU kernels)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from labkit.cli.main import main
from labkit.core.devices import (
    DEVICE_ENV,
    PRECISION_ENV,
    choose_for_children,
    default_device,
    mixed_precision,
    module_device,
    resolve_device,
    to_module_device,
)
from labkit.core.errors import ParameterError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.training.common import StageRun
from labkit.training.lm import SCHEDULES as LM_SCHEDULES
from labkit.training.lm import train_lm
from labkit.training.loop import THROUGHPUT

TINY = get_preset("tiny")
SAMPLE = project_root() / "data_samples" / "storystream-mini"
HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_torch_sees_a_gpu_and_the_cpu_otherwise():
    assert resolve_device().type == resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("CPU").type == "cpu"


def test_auto_precision_is_bf16_on_a_bf16_gpu_and_fp32_on_the_cpu(monkeypatch):
    assert mixed_precision(torch.device("cpu")) == "no"
    assert mixed_precision(torch.device("cpu"), "bf16") == "bf16"  # CPU autocast: how these tests reach bf16
    assert mixed_precision(torch.device("cpu"), "fp32") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert mixed_precision(torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100: fp32, not fp16
    assert mixed_precision(torch.device("cuda")) == "no"


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_parameter_error_naming_the_flag():
    with pytest.raises(ParameterError, match="--device: cuda was asked for but torch sees no GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "cuda:0x", "gpu"])
def test_unknown_devices_and_precisions_are_refused(name):
    with pytest.raises(ParameterError, match="--device"):
        resolve_device(name)
    with pytest.raises(ParameterError, match="--precision"):
        mixed_precision(torch.device("cpu"), "fp16")


def test_the_environment_carries_the_choice_to_child_processes(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "auto")  # recorded, so that teardown removes what the test sets
    monkeypatch.setenv(PRECISION_ENV, "auto")
    choose_for_children("cpu", "bf16")
    assert default_device().type == "cpu" and mixed_precision(default_device()) == "bf16"
    assert StageRun(TINY).plan(LM_SCHEDULES).mixed_precision == "bf16"  # a stage process started now reads it
    monkeypatch.setenv(DEVICE_ENV, "quantum")
    with pytest.raises(ParameterError, match=r"\$LABKIT_DEVICE"):
        default_device()


def test_stage_plans_record_the_precision_they_train_in(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "auto")
    fp32 = StageRun(TINY, device="cpu").plan(LM_SCHEDULES)
    bf16 = StageRun(TINY, device="cpu", precision="bf16").plan(LM_SCHEDULES)
    assert fp32.mixed_precision == "no" and bf16.mixed_precision == "bf16"
    assert (fp32.steps, fp32.lr) == (bf16.steps, bf16.lr)  # nothing else changes


def test_evaluation_helpers_take_cpu_data_to_the_model_and_return_cpu_results():
    layer = torch.nn.Linear(3, 2)
    assert module_device(layer).type == "cpu" and module_device(torch.nn.ReLU()).type == "cpu"
    assert to_module_device(layer, torch.ones(1, 3)).device == module_device(layer)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only refusal")
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "lm", "--device", "cuda", "--data", str(SAMPLE), "--steps", "1"],
        ["train", "stage2", "--device", "tpu", "--data", str(SAMPLE)],
        ["train", "lm", "--precision", "fp8", "--data", str(SAMPLE)],
        ["report", "--device", "cuda", "--grid-only"],
    ],
)
def test_the_cli_refuses_a_device_it_cannot_use_with_exit_2_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "auto")  # recorded, so that teardown removes what the test sets
    monkeypatch.setenv(PRECISION_ENV, "auto")
    code = main([*argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and ("--device" in err or "--precision" in err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_stage_trains_under_bf16_autocast_and_keeps_fp32_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "auto")  # recorded, so that teardown removes what the test sets
    from accelerate import Accelerator

    Accelerator(cpu=True, mixed_precision="no")  # an fp32 run earlier in this process (a notebook, other tests)
    out = tmp_path / "lm"
    run = StageRun(TINY, steps=3, data_root=SAMPLE, out=out, progress=False, device="cpu", precision="bf16")
    manifest = train_lm(run)
    assert manifest["schedule_settings"]["mixed_precision"] == "bf16"
    losses = [entry["loss"] for entry in manifest["history"]]
    assert losses and all(math.isfinite(loss) for loss in losses)
    throughput = json.loads((out.with_name(f".{out.name}.run") / THROUGHPUT).read_text())
    assert throughput["mixed_precision"] == "bf16" and throughput["device"] == "cpu" and throughput["steps"] == 3
    assert throughput["tokens_per_second"] > 0 and throughput["peak_memory_gib"] is None
    from safetensors.torch import load_file

    weights = load_file(str(next(out.glob("**/*.safetensors"))))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # autocast never touches the weights
