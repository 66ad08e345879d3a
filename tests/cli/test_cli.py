"""The `labkit` command line: it works, and user mistakes give a clear message and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import labkit.data.storystream_mini as storystream_mini
from labkit.cli.main import main
from labkit.data.storystream_mini import MakeConfig, make_dataset

LABKIT = [sys.executable, "-m", "labkit.cli.main"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_reports_a_bad_parameter_without_traceback(tmp_path):
    out = tmp_path / "never"
    result = subprocess.run(
        LABKIT + ["data", "make", "--out", str(out), "--size", "-5"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "--size" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, parameter",
    [
        (["--preset", "huge"], "--preset"),
        (["--stories", "-1"], "--stories"),
        (["--frames", "0"], "--frames"),
        (["--frames", "101"], "--frames"),
        (["--size", "0"], "--size"),
        (["--seed", "-3"], "--seed"),
        (["--stories", "2", "--val-stories", "-1"], "--val-stories"),
    ],
)
def test_bad_make_parameters_name_the_parameter(tmp_path, capsys, args, parameter):
    code, _, err = run(["data", "make", "--out", str(tmp_path / "d"), *args], capsys)
    assert code == 2 and parameter in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_make_refuses_to_clobber_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    code, _, err = run(
        ["data", "make", "--out", str(tmp_path / "d"), "--stories", "1", "--frames", "2", "--quiet"], capsys
    )
    assert code == 2 and "already exists" in err
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_a_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = storystream_mini.render_frame

    def flaky(story, index, size=64):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real(story, index, size)

    monkeypatch.setattr(storystream_mini, "render_frame", flaky)
    with pytest.raises(RuntimeError):
        make_dataset(
            tmp_path / "d",
            MakeConfig(train_stories=2, val_stories=1, test_stories=1, frames=4, size=32),
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def _files(root: Path) -> dict[str, bytes]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.relative_to(root).parts[0] != "cache"}


def test_same_seed_gives_byte_identical_data_and_another_seed_differs(tmp_path, small_dataset, small_config):
    make_dataset(tmp_path / "again", small_config, progress=False)
    first, second = _files(small_dataset), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert (
        any(k.endswith(".png") for k in first)
        and "train.annotations.jsonl" in first
        and "tokenizer/tokenizer.json" in first
    )
    assert [k for k in first if first[k] != second[k]] == []
    other_seed = MakeConfig(**{**small_config.__dict__, "seed": small_config.seed + 1})
    make_dataset(tmp_path / "other", other_seed, progress=False)
    other = _files(tmp_path / "other")
    for name in ("train.jsonl", "train.annotations.jsonl", "images/train/train_00000/train_00000_000.png"):
        assert other[name] != first[name], name


def test_splits_use_disjoint_story_seeds(small_dataset):
    seeds = {}
    for split in ("train", "val", "test"):
        for line in (small_dataset / f"{split}.annotations.jsonl").read_text().splitlines():
            seeds.setdefault(split, set()).add(json.loads(line)["seed"])
    assert (
        not (seeds["train"] & seeds["val"])
        and not (seeds["train"] & seeds["test"])
        and not (seeds["val"] & seeds["test"])
    )


def test_annotations_agree_with_the_stories(small_dataset):
    for split in ("train", "val", "test"):
        records = [json.loads(line) for line in (small_dataset / f"{split}.jsonl").read_text().splitlines()]
        truths = [json.loads(line) for line in (small_dataset / f"{split}.annotations.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == [t["id"] for t in truths]
        for record, truth in zip(records, truths):
            assert len(truth["frames"]) == len(record["captions"]) == len(record["images"])
            assert truth["protagonist"] in record["captions"][0]
            assert {f["protagonist"] for f in truth["frames"]} == {truth["protagonist"]}
            assert {f["style"] for f in truth["frames"]} == {truth["style"]}


def test_validate_a_data_set_folder_and_a_bad_file(small_dataset, tmp_path, capsys):
    code, out, _ = run(["data", "validate", str(small_dataset)], capsys)
    assert code == 0 and out.count(": ok (") == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "images": ["a.png"], "captions": ["x"]}\n{"id": 2,\n')
    code, _, err = run(["data", "validate", str(bad), "--image-root", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{bad}:1: image file not found" in err and f"{bad}:2: malformed JSON" in err


def test_validate_an_empty_or_missing_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(["data", "validate", str(empty)], capsys)
    assert code == 2 and f"{empty}: file is empty" in err
    code, _, err = run(["data", "validate", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "file not found" in err


def test_chunk_command_and_its_bad_input(small_dataset, tmp_path, capsys):
    out = tmp_path / "train_10.jsonl"
    code, stdout, _ = run(["data", "chunk", str(small_dataset / "train.jsonl"), str(out), "--length", "5"], capsys)
    assert code == 0 and "8 chunks" in stdout  # 4 stories x 12 frames -> 2 chunks of 5 each (tails of 2 dropped)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [chunk["id"] for chunk in lines] == [0, 0, 1, 1, 2, 2, 3, 3] and all(
        len(chunk["images"]) == 5 for chunk in lines
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1, "images": ["a"], "captions": ["\xff"]}\n')
    code, _, err = run(["data", "chunk", str(bad), str(tmp_path / "never.jsonl")], capsys)
    assert code == 2 and f"{bad}:1: not valid UTF-8" in err and not (tmp_path / "never.jsonl").exists()
    code, _, err = run(
        ["data", "chunk", str(small_dataset / "train.jsonl"), str(tmp_path / "x.jsonl"), "--length", "0"], capsys
    )
    assert code == 2 and "--length" in err


def test_show_saves_a_strip(small_dataset, tmp_path, capsys):
    out = tmp_path / "strip.png"
    code, stdout, _ = run(["data", "show", str(small_dataset), "--story", "val_00000", "--out", str(out)], capsys)
    assert code == 0 and out.is_file()
    with Image.open(out) as strip:
        assert strip.width > 32 * 9 and strip.height >= 32 * 2  # 12 frames of 32 px: 10 per row
    assert stdout.count("\n") >= 12
    code, _, err = run(["data", "show", str(small_dataset), "--story", "nobody", "--out", str(out)], capsys)
    assert code == 2 and "no story with id 'nobody'" in err


def test_doctor_lists_versions_and_optional_weights(capsys):
    code, out, _ = run(["doctor", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["packages"]["torch"] and info["torch_threads"] >= 1
    names = [w["name"] for w in info["optional_weights"]]
    assert any("LPIPS" in n for n in names) and any("AlexNet" in n for n in names) and any("MiniLM" in n for n in names)
    assert all(w["present"] or w["how_to_get"] for w in info["optional_weights"])


def test_committed_sample_is_what_its_readme_command_makes(tmp_path, capsys):
    from labkit.core.paths import project_root

    sample = project_root() / "data_samples" / "storystream-mini"
    code, _, _ = run(
        [
            "data",
            "make",
            "--out",
            str(tmp_path / "s"),
            "--stories",
            "8",
            "--val-stories",
            "2",
            "--test-stories",
            "2",
            "--seed",
            "0",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    made, committed = _files(tmp_path / "s"), _files(sample)
    assert made.keys() == committed.keys()
    assert [k for k in made if made[k] != committed[k]] == [], "rerun the command in data_samples/README.md"


def test_sink_check_refuses_a_bad_story_count(capsys):
    code, _, err = run(["sink-check", "--stories", "0"], capsys)
    assert code == 2 and "--stories" in err and "Traceback" not in err


@pytest.mark.slow
def test_sink_check_measures_the_reference_mllm_per_layer(tmp_path, capsys):
    out = tmp_path / "sink.json"
    code, printed, _ = run(["sink-check", "--stories", "1", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and "window / sink beyond" in printed
    evidence = json.loads(out.read_text())
    layers = len(evidence["bos_multimodal"]["mean_over_heads"])
    assert layers == len(evidence["bos_plain_captions"]["mean_over_heads"]) > 0
    assert set(evidence["teacher_forced"]) == {"dense", "window", "sink", "mm-sink"}
    assert evidence["window_tokens"] > 0 and set(evidence["targets"]) >= {"bos_met", "window_over_sink_met"}
