"""Shared fixtures: one small StoryStream-mini data set made once per test session."""

from __future__ import annotations

import pytest

from labkit.data.storystream_mini import MakeConfig, make_dataset

SMALL = MakeConfig(
    train_stories=4, val_stories=1, test_stories=1, frames=12, size=32, seed=7, bpe_merges=200, image_tokens=8
)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A 4/1/1-story data set of 12 frames at 32 px (about a second to make)."""
    root = tmp_path_factory.mktemp("data") / "mini"
    make_dataset(root, SMALL, progress=False)
    return root
