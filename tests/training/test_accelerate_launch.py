"""Stage 2 through `torchrun --nproc_per_node 2`: the same code, two CPU processes (Accelerate's DDP over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from labkit.core.paths import project_root

pytestmark = pytest.mark.slow  # trains or launches processes: `make test` runs it, `make test-fast` does not


def test_two_cpu_processes_run_a_short_stage2_job(tmp_path):
    sample = project_root() / "data_samples" / "storystream-mini"
    out = tmp_path / "mllm"
    # torchrun, not `accelerate launch --cpu --num_processes 2`: without mpirun the latter starts one process
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "labkit.cli.main",
        "train",
        "stage2",
        "--data",
        str(sample),
        "--steps",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "stage2" and manifest["history"][-1]["step"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    throughput = json.loads((out.with_name(f".{out.name}.run") / "throughput.json").read_text())
    assert throughput["processes"] == 2  # really two ranks, each training its half of the batch
