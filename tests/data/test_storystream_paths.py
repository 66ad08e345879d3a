"""A StoryStream image path must stay inside the image root: absolute paths and `..` escapes are refused on reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from labkit.cli.main import main
from labkit.core.errors import DataError
from labkit.data.storystream import image_file, image_path_problem, read_jsonl, validate

ESCAPES = ["../../etc/passwd", "/etc/passwd", "images/../../secret.png", "..\\..\\etc\\passwd", "C:\\Windows\\win.ini"]


def data_set(tmp_path, bad: str):
    """A jsonl file beside `images/`: line 1 a good story, line 2 blank, line 3 a story whose second image is `bad`."""
    images = tmp_path / "images"
    (images / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    Image.new("RGB", (8, 8), "blue").save(images / "images" / "a.png")
    path = tmp_path / "x.jsonl"
    lines = [
        {"id": 1, "images": ["a.png", "images/a.png"], "captions": ["one", "two"], "orders": [0, 1]},
        {"id": 2, "images": ["a.png", bad], "captions": ["one", "two"], "orders": [0, 1]},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n", encoding="utf-8")
    return path, images


@pytest.mark.parametrize("bad", ESCAPES)
def test_read_jsonl_refuses_a_path_out_of_the_image_root_naming_file_and_line(tmp_path, bad):
    path, images = data_set(tmp_path, bad)
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert error.value.problems == [f"{path}:3: " + image_path_problem(images, bad)]
    assert str(error.value).startswith(f"{path}:3: image path {bad!r} leaves the image root {images}")


def test_the_messages(tmp_path):
    path, images = data_set(tmp_path, "../../etc/passwd")
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value) == f"{path}:3: image path '../../etc/passwd' leaves the image root {images}"
    path, images = data_set(tmp_path, "/etc/passwd")
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value) == (
        f"{path}:3: image path '/etc/passwd' leaves the image root {images} "
        "(it is absolute; paths are relative to the root)"
    )


@pytest.mark.parametrize("bad", ESCAPES)
@pytest.mark.parametrize("check_images", [True, False])
def test_validate_refuses_it_as_a_structure_problem(tmp_path, bad, check_images):
    path, images = data_set(tmp_path, bad)
    report = validate(path, check_images=check_images)
    assert report.problems == [f"{path}:3: " + image_path_problem(images, bad)]
    assert report.stories == 1 and report.images_checked == (2 if check_images else 0)  # the bad story: not opened


def test_the_named_image_root_is_the_one_checked_and_named(tmp_path):
    path, images = data_set(tmp_path, "../x.png")  # inside tmp_path, but outside images/
    with pytest.raises(DataError, match=f"{path}:3: image path '../x.png' leaves the image root {images}$"):
        read_jsonl(path)
    other = tmp_path / "elsewhere" / "root"
    report = validate(path, image_root=other, check_images=False)
    assert report.problems == [f"{path}:3: image path '../x.png' leaves the image root {other}"]


def test_a_symbolic_link_out_of_the_root_is_refused_when_images_are_opened(tmp_path):
    path, images = data_set(tmp_path, "link.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "green").save(outside)
    (images / "link.png").symlink_to(outside)
    assert len(read_jsonl(path)) == 2  # the structure alone cannot tell
    report = validate(path)
    assert report.problems == [
        f"{path}:3: image path 'link.png' leaves the image root {images} (it resolves to {outside})"
    ]
    with pytest.raises(DataError, match=f"^{path}:3: image path 'link.png' leaves the image root"):
        image_file(images, "link.png", path, 3)


def test_relative_paths_inside_the_root_still_work(tmp_path):
    path, images = data_set(tmp_path, "images/a.png")
    assert [r.images for r in read_jsonl(path)] == [["a.png", "images/a.png"]] * 2
    report = validate(path)
    assert report.ok and report.images_checked == 4
    assert image_file(images, "images/a.png") == images / "images" / "a.png"
    assert image_file(images, "images/../a.png") == images / "images/../a.png"  # `..` that stays inside is fine
    for good in ("a.png", "./a.png", "sub/dir/a.png", "a..b.png", "..a.png"):
        assert image_path_problem(images, good) is None


def test_image_file_raises_a_located_data_error(tmp_path):
    with pytest.raises(DataError) as error:
        image_file(tmp_path / "images", "/etc/passwd", tmp_path / "x.jsonl", 7)
    assert str(error.value).startswith(f"{tmp_path / 'x.jsonl'}:7: image path '/etc/passwd' leaves the image root")


# ---- through the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
@pytest.mark.parametrize(
    "command", [["data", "validate"], ["data", "validate", "--no-images"], ["data", "show", "--story", "2"]]
)
def test_data_validate_and_show_exit_2(tmp_path, capsys, monkeypatch, bad, command):
    monkeypatch.chdir(tmp_path)  # `data show` writes story_<id>.png here: it must not
    path, images = data_set(tmp_path, bad)
    code = main([*command[:2], str(path), *command[2:]])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert f"{path}:3: image path {bad!r} leaves the image root {images}" in err
    assert not (tmp_path / "story_2.png").exists()


def test_console_script_data_validate_exits_2_without_traceback(tmp_path):
    path, images = data_set(tmp_path, "../../etc/passwd")
    result = subprocess.run(
        [sys.executable, "-m", "labkit.cli.main", "data", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert f"{path}:3: image path '../../etc/passwd' leaves the image root {images}" in result.stderr
    assert "Traceback" not in result.stderr and "/etc/passwd: ok" not in result.stdout
