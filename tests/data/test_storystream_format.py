"""The StoryStream jsonl format: round trip, validation, chunking."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from labkit.core.errors import DataError, LabError
from labkit.data.storystream import StoryRecord, chunk_stories, read_jsonl, validate, write_jsonl


def _story(story_id, frames: int) -> StoryRecord:
    return StoryRecord(
        story_id,
        [f"{story_id}/{i:03d}.png" for i in range(frames)],
        [f"caption {i} ü" for i in range(frames)],
        list(range(frames)),
    )


def test_round_trip_keeps_every_field(tmp_path):
    records = [
        _story("000258", 30),
        StoryRecord(3, ["a.jpg", "b.jpg"], ["one", "two"]),
    ]  # official chunks: int id, no orders
    write_jsonl(tmp_path / "s.jsonl", records)
    assert read_jsonl(tmp_path / "s.jsonl") == records
    first = json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "images", "captions", "orders"}
    assert "orders" not in json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[1])


def test_chunking_30_frames_gives_three_chunks_of_10():
    chunks = chunk_stories([_story("a", 30), _story("b", 25)], length=10)
    assert [len(c) for c in chunks] == [10] * 5  # 3 from a, 2 from b: b's 5-frame tail is dropped
    assert [c.id for c in chunks] == [0, 0, 0, 1, 1]  # official: id = index of the source story
    assert all(c.orders is None for c in chunks)  # official: orders dropped
    assert chunks[1].images == [f"a/{i:03d}.png" for i in range(10, 20)]
    assert chunks[4].captions[-1] == "caption 19 ü"


def test_chunking_rejects_a_length_below_two():
    with pytest.raises(LabError, match="--length"):
        chunk_stories([_story("a", 30)], length=1)


def test_made_data_set_validates(small_dataset):
    for split in ("train", "val", "test"):
        report = validate(small_dataset / f"{split}.jsonl")
        assert report.ok, report.problems
        assert report.images_checked == report.frames > 0


def _write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))


def test_validation_reports_every_problem_with_path_and_line(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("this is not an image")
    full = tmp_path / "full.png"
    Image.new("RGB", (64, 64), "blue").save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    good = {"id": 1, "images": ["ok.png"], "captions": ["fine"]}
    path = tmp_path / "bad.jsonl"
    _write_lines(
        path,
        [
            json.dumps(good),
            '{"id": 2, "images": ["ok.png"], "captions": ',  # line 2: malformed JSON
            json.dumps({"id": 3, "images": ["missing.png"], "captions": ["x"]}),  # line 3: missing image
            json.dumps({"id": 4, "images": ["ok.png", "ok.png"], "captions": ["x"]}),  # line 4: length mismatch
            json.dumps({"id": 5, "images": ["text.png"], "captions": ["x"]}),  # line 5: not an image
            json.dumps({"id": 6, "images": ["cut.png"], "captions": ["x"]}),  # line 6: truncated image
            b'{"id": 7, "images": ["ok.png"], "captions": ["caf\xe9"]}',  # line 7: Latin-1, not UTF-8
            json.dumps({"images": ["ok.png"], "captions": ["x"]}),  # line 8: no id
        ],
    )
    report = validate(path, image_root=tmp_path)
    by_line = {int(p.split(":")[1]): p for p in report.problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]
    assert all(p.startswith(str(path)) for p in report.problems)
    assert "malformed JSON" in by_line[2]
    assert "image file not found" in by_line[3] and "missing.png" in by_line[3]
    assert "'images' has 2 entries but 'captions' has 1" in by_line[4]
    assert "not an image file" in by_line[5]
    assert "damaged image" in by_line[6] and "cut.png" in by_line[6]
    assert "not valid UTF-8" in by_line[7]
    assert "missing key 'id'" in by_line[8]
    assert report.stories == 4  # lines 1, 3, 5 and 6 are well-formed stories (their images are the problem)
    # read_jsonl checks structure only and raises with every structural problem
    with pytest.raises(DataError) as raised:
        read_jsonl(path)
    assert sorted(int(p.split(":")[1]) for p in raised.value.problems) == [2, 4, 7, 8]


def test_empty_file_is_a_clear_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    report = validate(path)
    assert report.problems == [f"{path}: file is empty (expected one JSON story per line)"]
