"""Artifact folders: what each training stage leaves behind, with a manifest that says how it was made.

A folder holds ``model.safetensors`` (fp16 for committed reference checkpoints) and ``manifest.json``:
stage, preset, config hash, seed, git commit, package versions, wall time, the exact command and the
final metrics. A later stage loads an artifact only if its preset and config hash match the current code's,
so a checkpoint trained with other sizes is refused with a message that says how to retrain it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .atomic import replace_directory
from .errors import LabError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def config_hash(config: Any) -> str:
    """A short, stable hash of a (nested) dataclass config: changes whenever any size or setting changes."""
    payload = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def weights_hash(folder: Path | str) -> str:
    """A short hash of an artifact's weights file: caches derived from a model (features, regressed features,
    generated stories) are keyed by it, so retrained weights are never served stale results."""
    return hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()[:16]


def command_line() -> str:
    return " ".join(["labkit" if sys.argv and sys.argv[0].endswith("labkit") else Path(sys.argv[0]).name, *sys.argv[1:]])


def save_artifact(folder: Path | str, state_dict: dict[str, torch.Tensor], manifest: dict, half: bool = False,
                  extra: Callable[[Path], None] | None = None) -> Path:
    """Write weights + manifest (+ whatever `extra(folder)` writes, e.g. a tokenizer) into `folder` atomically:
    everything goes to a temporary sibling that is renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in state_dict.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        if extra is not None:
            extra(tmp)
        replace_directory(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise LabError(f"{path}: not found (not an artifact folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise LabError(f"{path}:{error.lineno}: malformed manifest ({error.msg})") from None


def load_artifact(folder: Path | str, stage: str, preset: str, expected_hash: str, retrain: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an artifact's weights (as fp32) and manifest; refuse one made for another preset or config.

    `retrain` is the command that rebuilds it, quoted in every refusal.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("stage") != stage:
        raise LabError(f"{folder}: is a {manifest.get('stage')!r} artifact, expected {stage!r}")
    if manifest.get("preset") != preset:
        raise LabError(f"{folder}: was trained for preset {manifest.get('preset')!r}, not {preset!r}. Retrain it: {retrain}")
    if manifest.get("config_hash") != expected_hash:
        raise LabError(f"{folder}: config hash {manifest.get('config_hash')} does not match the current code's "
                       f"{preset} preset ({expected_hash}): the model sizes or settings changed since it was trained. "
                       f"Retrain it: {retrain}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise LabError(f"{weights}: not found")
    tensors = load_file(str(weights))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, manifest
