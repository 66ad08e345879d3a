"""`make_dataset` renders stories in several processes for large sets (the small preset's 2,200 stories): the data
set must be byte-for-byte the one a single process makes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import labkit.data.storystream_mini as storystream_mini
from labkit.data.storystream_mini import MakeConfig, make_dataset


def folder_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_two_rendering_processes_make_the_same_bytes_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(storystream_mini, "PARALLEL_FROM", 1)  # use the pool even for this small set
    config = MakeConfig(train_stories=5, val_stories=2, test_stories=2, size=48, bpe_merges=32, frames=3)
    one = make_dataset(tmp_path / "one", config, progress=False, workers=1)
    two = make_dataset(tmp_path / "two", config, progress=False, workers=2)
    assert one == two and folder_digest(tmp_path / "one") == folder_digest(tmp_path / "two")
    assert len(list((tmp_path / "two" / "images").rglob("*.png"))) == 9 * 3
