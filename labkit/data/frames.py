"""Frames and ground truth of a data set split as tensors, for training and evaluation.

A tiny split is small (160 stories x 30 frames x 64² RGB = 59 MB as uint8), so it is decoded once and
cached as one ``.pt`` file next to the data (``<root>/cache/<split>-frames.pt``), then kept in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from labkit.data.storystream_mini import open_split
from labkit.data.storyworld import CHARACTERS, SCENES, STYLES

CHARACTER_NAMES = tuple(c.name for c in CHARACTERS)
STYLE_NAMES = tuple(s.name for s in STYLES)
SCENE_NAMES = tuple(s.name for s in SCENES)


@dataclass
class SplitFrames:
    """Every frame of a split: pixels and per-frame labels, indexed [story, frame]."""

    images: torch.Tensor  # uint8 [S, F, 3, H, W]
    protagonist: torch.Tensor  # long [S, F], index into CHARACTER_NAMES
    style: torch.Tensor  # long [S, F], index into STYLE_NAMES
    scene: torch.Tensor  # long [S, F], index into SCENE_NAMES
    captions: list[list[str]]  # [S][F]
    story_ids: list[str]

    @property
    def stories(self) -> int:
        return self.images.shape[0]

    @property
    def frames(self) -> int:
        return self.images.shape[1]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] in 0..255 -> float in [-1, 1] (the lab's one pixel convention)."""
    return images.float().div(127.5).sub(1.0)


def load_frames(root: Path | str, split: str = "train") -> SplitFrames:
    """Decode (or read the cached decode of) a split's frames and labels."""
    root = Path(root)
    cache = root / "cache" / f"{split}-frames.pt"
    source = root / f"{split}.jsonl"
    if cache.is_file() and cache.stat().st_mtime >= source.stat().st_mtime:
        return SplitFrames(**torch.load(cache, weights_only=False))
    data = open_split(root, split)
    images, protagonist, style, scene = [], [], [], []
    for index, record in enumerate(data.records):
        truth = data.annotations[str(record.id)]["frames"]
        images.append(np.stack([np.asarray(data.image(index, f)) for f in range(len(record))]))
        protagonist.append([CHARACTER_NAMES.index(t["protagonist"]) for t in truth])
        style.append([STYLE_NAMES.index(t["style"]) for t in truth])
        scene.append([SCENE_NAMES.index(t["scene"]) for t in truth])
    fields = {
        "images": torch.from_numpy(np.stack(images)).permute(0, 1, 4, 2, 3).contiguous(),
        "protagonist": torch.tensor(protagonist),
        "style": torch.tensor(style),
        "scene": torch.tensor(scene),
        "captions": [list(r.captions) for r in data.records],
        "story_ids": [str(r.id) for r in data.records],
    }
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    torch.save(fields, tmp)
    os.replace(tmp, cache)
    return SplitFrames(**fields)
