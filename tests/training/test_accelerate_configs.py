"""`configs/accelerate/`: each file read by Accelerate's own loader and launch validation, so a typo fails here."""

from __future__ import annotations

import json

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env
from transformers import LlamaForCausalLM

from labkit.core.errors import LabError
from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.training.common import StageRun
from labkit.training.sharding import refuse_unsupported_fsdp
from labkit.training.stage2 import train_stage2

CONFIGS = project_root() / "configs" / "accelerate"


def launch_environment(name: str, monkeypatch) -> dict[str, str]:
    """What `accelerate launch --config_file <name>` would put in each process's environment."""
    monkeypatch.chdir(project_root())  # the commands run from the repository root (README)
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"])
def test_every_config_loads_with_8_processes(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.num_processes == 8 and config.num_machines == 1 and not config.use_cpu


def test_ddp_and_fsdp_launch_in_bf16(monkeypatch):
    assert load_config_from_file(str(CONFIGS / "ddp.yaml")).distributed_type == DistributedType.MULTI_GPU
    assert launch_environment("ddp.yaml", monkeypatch)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    env = launch_environment("fsdp.yaml", monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # full shard: a layer's parameters freed after its forward
    # the wrap class must be the decoder layer transformers' Llama names (a typo would wrap nothing)
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] in LlamaForCausalLM._no_split_modules


def test_deepspeed_is_zero2_bf16_as_the_official_run():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    path = project_root() / config.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] in ("auto", True)
    # set, not "auto": the loop prepares no DataLoader from which Accelerate could fill them
    assert ds["train_micro_batch_size_per_gpu"] == 30 and ds["gradient_clipping"] == 1.0
    assert ds["gradient_accumulation_steps"] == 1


def test_fsdp_is_refused_before_any_work_where_it_is_not_wired_and_in_version_1(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    # the tiny preset's stage 2 trains the whole MLLM and saves it unsharded: only the paper preset's LoRA is wired
    with pytest.raises(LabError, match="stage 2 .*does not run under FSDP"):
        train_stage2(StageRun(get_preset("tiny"), data_root=tmp_path / "nowhere", out=tmp_path / "mllm"))
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LabError, match="FSDP 1 is not supported"):
        refuse_unsupported_fsdp("stage 2", supported=True)
    assert not (tmp_path / "mllm").exists()
