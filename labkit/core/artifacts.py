"""Artifact folders: what each training stage leaves behind, with a manifest that says how it was made.

A folder holds ``model.safetensors`` (fp16 for committed reference checkpoints) and ``manifest.json``:
stage, preset, config hash, seed, git commit, package versions, wall time, the exact command and the
final metrics. A later stage loads an artifact only if its preset and config hash match the current code's,
so a checkpoint trained with other sizes is refused with a message that says how to retrain it.

This module is also the lab's artifact registry (`docs/architecture.md`, "The artifact graph"): `ARTIFACTS` says
for each artifact what it is, what it needs and the one `labkit train` command that builds it; `require()` is how
the report and the notebooks get an artifact. It never trains: a missing, stale or damaged artifact is a
`LabError` that names that command. The trainers and loaders that go with each name are in
`labkit.training.registry`, a layer up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from labkit.core.atomic import replace_directory
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import checkpoints_folder, quick_folder

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


class StaleArtifact(LabError):
    """An artifact made for another preset, or with sizes or settings the current code no longer has."""


@dataclass(frozen=True)
class ArtifactKind:
    name: str  # its folder: checkpoints/<preset>/<name> (reference) or artifacts/<preset>/quick/<name>
    stage: str  # the `stage` its manifest records
    what: str  # for messages: "the visual tokenizer (stage 0)"
    train: str  # the `labkit train` arguments that build it
    needs: tuple[str, ...] = ()  # artifacts its trainer reads


# In the order `labkit report --retrain` starts them when ready: the longest chain (tokenizer -> MLLM -> stage 3)
# first.
ARTIFACTS: dict[str, ArtifactKind] = {
    kind.name: kind
    for kind in (
        ArtifactKind("visual_tokenizer", "visual_tokenizer", "the visual tokenizer (stage 0)", "stage0"),
        ArtifactKind("judges", "judges", "the judges that score pictures (stage 0)", "stage0"),
        ArtifactKind("lm", "lm", "the pre-trained language model (before stage 2)", "lm"),
        ArtifactKind("vae", "vae", "the de-tokenizer's VAE (stage 1)", "stage1", ("judges",)),
        ArtifactKind("mllm", "stage2", "the MLLM (stage 2)", "stage2", ("visual_tokenizer", "lm")),
        ArtifactKind(
            "detokenizer", "stage1", "the de-tokenizer (stage 1)", "stage1", ("vae", "visual_tokenizer", "judges")
        ),
        ArtifactKind(
            "detokenizer_official",
            "stage3",
            "the adapted de-tokenizer, official mode (stage 3)",
            "stage3 --mode official",
            ("visual_tokenizer", "judges", "mllm", "detokenizer"),
        ),
        ArtifactKind(
            "detokenizer_full",
            "stage3",
            "the adapted de-tokenizer, full mode (stage 3)",
            "stage3 --mode full",
            ("visual_tokenizer", "judges", "mllm", "detokenizer"),
        ),
    )
}


def artifact_kind(name: str) -> ArtifactKind:
    if name not in ARTIFACTS:
        raise ParameterError("artifact", f"unknown artifact {name!r}; the lab has {', '.join(ARTIFACTS)}")
    return ARTIFACTS[name]


def build_command(name: str, preset: str, schedule: str = "reference") -> str:
    """The one command that builds an artifact: the reference checkpoint, or a `quick` one (minutes)."""
    command = f"labkit train {artifact_kind(name).train} --preset {preset}"
    return command + " --schedule reference" if schedule == "reference" else command


def locate_artifact(name: str, preset: str) -> Path | None:
    """The reference checkpoint <checkpoints_folder>/<name> if present, else artifacts/<preset>/quick/<name>, else
    None."""
    for folder in (checkpoints_folder(preset) / name, quick_folder(preset) / name):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def check_weights_file(path: Path) -> None:
    """Refuse a safetensors file that is cut short or is not one, from its header alone (no tensor is read).

    The format is an 8-byte little-endian header length, a JSON header whose `data_offsets` say where each
    tensor's bytes lie, then the bytes: a complete file is exactly as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise LabError(f"{path}: damaged weights file ({size} bytes: too short to be safetensors)")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                raise LabError(
                    f"{path}: damaged weights file (cut short: {size} bytes, its header alone needs "
                    f"{8 + header_length})"
                )
            header = json.loads(handle.read(header_length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LabError(f"{path}: damaged weights file (its header is not valid JSON)") from None
    except OSError as error:
        raise LabError(f"{path}: cannot read ({error.strerror})") from None
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        state = "cut short" if size < expected else "has trailing bytes"
        raise LabError(f"{path}: damaged weights file ({state}: {size} bytes, its header says {expected})")


def validate_artifact(folder: Path | str, name: str, preset: str) -> dict:
    """The one check every artifact passes before anything loads it: a readable manifest of the right stage and
    preset, and complete weight files. Returns the manifest. Sizes (config hashes) are checked by the loaders."""
    folder, kind = Path(folder), artifact_kind(name)
    manifest = read_manifest(folder)
    if manifest.get("stage") != kind.stage:
        raise LabError(f"{folder}: is a {manifest.get('stage')!r} artifact, expected {kind.stage!r} ({kind.what})")
    if manifest.get("preset") != preset:
        raise StaleArtifact(f"{folder}: was trained for preset {manifest.get('preset')!r}, not {preset!r}")
    weights = sorted(folder.rglob("*.safetensors"))
    if not weights:
        raise LabError(f"{folder}: has no weights (*.safetensors)")
    for path in weights:
        check_weights_file(path)
    return manifest


def rebuild_command(folder: Path, name: str, preset: str) -> str:
    """The command that rebuilds the artifact found at `folder`: a quick one stays quick."""
    return build_command(name, preset, "quick" if Path(folder).parent == quick_folder(preset) else "reference")


def checked_manifest(folder: Path | str, name: str, preset: str) -> dict:
    """`validate_artifact`, with the command that rebuilds the artifact added to any refusal."""
    artifact_kind(name)  # an unknown name is a ParameterError of its own, not an artifact to rebuild
    try:
        return validate_artifact(folder, name, preset)
    except LabError as error:
        raise type(error)(f"{error}. Rebuild it: {rebuild_command(Path(folder), name, preset)}") from None


def require(name: str, preset: str) -> Path:
    """The folder of a valid artifact, for the report and the notebooks. Never trains: anything missing, stale or
    damaged is a `LabError` naming the command that (re)builds it."""
    kind = artifact_kind(name)
    folder = locate_artifact(name, preset)
    if folder is None:
        raise LabError(
            f"{kind.what} for preset {preset!r} is missing (looked in {checkpoints_folder(preset) / name} "
            f"and {quick_folder(preset) / name}). Build it: {build_command(name, preset)}"
        )
    checked_manifest(folder, name, preset)
    return folder


def config_hash(config: Any) -> str:
    """A short, stable hash of a (nested) dataclass config: changes whenever any size or setting changes."""
    payload = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def weights_hash(folder: Path | str) -> str:
    """A short hash of an artifact's weights file: caches derived from a model (features, regressed features,
    generated stories) are keyed by it, so retrained weights are never served stale results."""
    return hashlib.sha256((Path(folder) / WEIGHTS).read_bytes()).hexdigest()[:16]


def save_artifact(
    folder: Path | str,
    state_dict: dict[str, torch.Tensor],
    manifest: dict,
    half: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write weights + manifest (+ whatever `extra(folder)` writes, e.g. a tokenizer) into `folder` atomically:
    everything goes to a temporary sibling that is renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in state_dict.items()
    }
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


def load_artifact(
    folder: Path | str, name: str, preset: str, expected_hash: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an artifact's weights (as fp32) and manifest; refuse one made for another preset or config, naming the
    command that rebuilds it."""
    folder = Path(folder)
    manifest = checked_manifest(folder, name, preset)
    if manifest.get("config_hash") != expected_hash:
        raise StaleArtifact(
            f"{folder}: config hash {manifest.get('config_hash')} does not match the current code's "
            f"{preset} preset ({expected_hash}): the model sizes or settings changed since it was "
            f"trained. Rebuild it: {rebuild_command(folder, name, preset)}"
        )
    tensors = load_file(str(folder / WEIGHTS))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, manifest
