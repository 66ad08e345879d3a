"""The artifact registry: `require()` never trains; a missing, stale or damaged artifact is a LabError naming the
one `labkit train` command that rebuilds it, and `labkit report` stops on it (exit 2) before any work."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from labkit.cli.main import main
from labkit.core.artifacts import (
    ARTIFACTS,
    MANIFEST,
    StaleArtifact,
    build_command,
    check_weights_file,
    require,
)
from labkit.core.errors import LabError
from labkit.core.paths import CHECKPOINTS_ENV, project_root, quick_folder
from labkit.core.presets import get_preset
from labkit.training.registry import LOADERS, TRAINERS

COMMITTED = project_root() / "checkpoints" / "tiny"


@pytest.fixture
def scratch_checkpoints(tmp_path, monkeypatch):
    """A copy of the committed reference checkpoints that the lab reads instead of checkpoints/tiny."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(COMMITTED, folder, ignore=shutil.ignore_patterns("features"))
    monkeypatch.setenv(CHECKPOINTS_ENV, str(folder))
    return folder


def _no_quick_artifacts(monkeypatch, tmp_path):
    """Point the quick-artifact folder somewhere empty, so only the scratch checkpoints count."""
    monkeypatch.setattr("labkit.core.artifacts.quick_folder", lambda preset: tmp_path / "quick" / preset)


def test_every_artifact_has_a_command_a_trainer_and_a_loader():
    assert TRAINERS.keys() == LOADERS.keys() == ARTIFACTS.keys()
    assert build_command("visual_tokenizer", "tiny") == "labkit train stage0 --preset tiny --schedule reference"
    assert build_command("detokenizer_full", "tiny", "quick") == "labkit train stage3 --mode full --preset tiny"
    for kind in ARTIFACTS.values():  # what an artifact needs comes before it: `--retrain` can start in order
        assert all(list(ARTIFACTS).index(need) < list(ARTIFACTS).index(kind.name) for need in kind.needs)


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_require_names_the_command_for_a_missing_artifact(name, scratch_checkpoints, monkeypatch, tmp_path):
    _no_quick_artifacts(monkeypatch, tmp_path)
    assert require(name, "tiny") == scratch_checkpoints / name
    shutil.rmtree(scratch_checkpoints / name)
    with pytest.raises(LabError) as error:
        require(name, "tiny")
    assert build_command(name, "tiny") in str(error.value)
    assert not (tmp_path / "quick").exists()  # nothing was trained


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_a_truncated_weight_file_is_refused_naming_the_file(name, scratch_checkpoints, monkeypatch, tmp_path):
    _no_quick_artifacts(monkeypatch, tmp_path)
    weights = sorted((scratch_checkpoints / name).rglob("*.safetensors"))
    assert weights, name
    target = max(weights, key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(LabError) as error:
        require(name, "tiny")
    message = str(error.value)
    assert str(target) in message and "cut short" in message and build_command(name, "tiny") in message
    with pytest.raises(LabError):  # the loaders go through the same check
        LOADERS[name](scratch_checkpoints / name, get_preset("tiny"))


def test_the_weights_check_reads_only_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    check_weights_file(path)  # complete
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 9)
    with pytest.raises(LabError, match="trailing bytes"):
        check_weights_file(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(LabError, match="too short"):
        check_weights_file(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(LabError, match="not valid JSON"):
        check_weights_file(path)


def test_an_artifact_of_another_preset_is_stale(scratch_checkpoints, monkeypatch, tmp_path):
    _no_quick_artifacts(monkeypatch, tmp_path)
    manifest_path = scratch_checkpoints / "judges" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "preset": "small"}))
    with pytest.raises(StaleArtifact, match="labkit train stage0 --preset tiny --schedule reference"):
        require("judges", "tiny")


def test_a_quick_artifact_is_rebuilt_with_the_quick_command(monkeypatch, tmp_path):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr("labkit.core.artifacts.quick_folder", lambda preset: tmp_path / "quick" / preset)
    shutil.copytree(COMMITTED / "mllm", tmp_path / "quick" / "tiny" / "mllm")
    (tmp_path / "quick" / "tiny" / "mllm" / "model.safetensors").write_bytes(b"")
    with pytest.raises(LabError) as error:
        require("mllm", "tiny")
    assert str(error.value).endswith("Rebuild it: labkit train stage2 --preset tiny")
    assert quick_folder("tiny") != tmp_path  # the real function is untouched


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_report_stops_before_any_work_when_an_artifact_is_missing(
    name, scratch_checkpoints, monkeypatch, tmp_path, capsys
):
    _no_quick_artifacts(monkeypatch, tmp_path)
    shutil.rmtree(scratch_checkpoints / name)
    out = tmp_path / "report"
    code = main(["report", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert build_command(name, "tiny") in err
    assert not out.exists() and not (tmp_path / "quick").exists()  # nothing written, nothing trained


def test_train_refuses_to_start_without_what_the_stage_reads(scratch_checkpoints, monkeypatch, tmp_path, capsys):
    _no_quick_artifacts(monkeypatch, tmp_path)
    shutil.rmtree(scratch_checkpoints / "visual_tokenizer")
    code = main(["train", "stage2", "--quiet", "--out", str(tmp_path / "mllm")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert build_command("visual_tokenizer", "tiny") in err
    assert not (tmp_path / "mllm").exists() and not (tmp_path / "quick").exists()
