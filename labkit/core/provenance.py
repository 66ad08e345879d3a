"""Provenance: which code, packages and command made a result (recorded in every manifest and report)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

from labkit.core.paths import project_root

PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "diffusers",
    "accelerate",
    "peft",
    "tokenizers",
    "safetensors",
    "papermill",
    "nbval",
    "lpips",
    "matplotlib",
    "ipywidgets",
    "jupyterlab",
    "tqdm",
    "numpy",
    "pillow",
)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str | None:
    """The CPU's model name (Linux), recorded beside results whose last digits depend on the machine's kernels."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    return " ".join(
        ["labkit" if sys.argv and sys.argv[0].endswith("labkit") else Path(sys.argv[0]).name, *sys.argv[1:]]
    )
