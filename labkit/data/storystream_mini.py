"""StoryStream-mini on disk: make a data set from the story world, and open one.

A data set folder::

    dataset.json                   what made it (seed, sizes, splits) - no timestamps, so runs are byte-identical
    train.jsonl val.jsonl test.jsonl            StoryStream format, paths relative to images/
    train.annotations.jsonl ...    per-frame ground truth (characters, protagonist, style, scene, props)
    images/<split>/<story>/<story>_<frame>.png
    tokenizer/                     BPE trained on the training captions (+ <img>, </img>, [INST], <img_xxxxx>)

Splits come from disjoint story seeds: every story's seed is derived from (seed, split, index).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from labkit.core.atomic import build_directory, write_text
from labkit.core.errors import LabError, ParameterError
from labkit.core.paths import artifacts_folder
from labkit.core.presets import Preset
from labkit.data.storystream import StoryRecord, image_file, read_jsonl, write_jsonl
from labkit.data.storyworld import Story, generate_story, render_frame
from labkit.data.text_tokenizer import StoryTokenizer

SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
FORMAT_VERSION = 1
PARALLEL_FROM = 100  # stories: below this, spawning processes costs more than rendering in this one


@dataclass(frozen=True)
class MakeConfig:
    """What `labkit data make` builds."""

    train_stories: int = 160
    val_stories: int = 24
    test_stories: int = 24
    frames: int = 30
    size: int = 64
    seed: int = 0
    bpe_merges: int = 1024
    image_tokens: int = 64

    def check(self) -> None:
        for name, flag in (
            ("train_stories", "--stories"),
            ("val_stories", "--val-stories"),
            ("test_stories", "--test-stories"),
        ):
            if getattr(self, name) < 0:
                raise ParameterError(flag, f"must be >= 0 (got {getattr(self, name)})")
        if self.train_stories < 1:
            raise ParameterError("--stories", "at least one training story is needed to train the tokenizer")
        if not 2 <= self.frames <= 100:
            raise ParameterError("--frames", f"must be in 2..100 (got {self.frames})")
        if not 32 <= self.size <= 1024:
            raise ParameterError("--size", f"must be in 32..1024 pixels (got {self.size})")
        if self.seed < 0:
            raise ParameterError("--seed", f"must be >= 0 (got {self.seed})")
        if self.bpe_merges < 0:
            raise ParameterError("bpe_merges", f"must be >= 0 (got {self.bpe_merges})")

    def stories(self, split: str) -> int:
        return getattr(self, f"{split}_stories")


def story_seed(seed: int, split: str, index: int) -> int:
    """A story's seed: distinct per (seed, split, index), so splits never share a story."""
    return int(np.random.SeedSequence([seed, SPLIT_CODES[split], index]).generate_state(1)[0])


def story_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def annotation_line(story: Story) -> dict:
    return {
        "id": story.id,
        "seed": story.seed,
        "protagonist": story.protagonist,
        "style": story.style,
        "frames": [asdict(frame) for frame in story.frames],
    }


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)  # PIL writes no timestamp: same pixels -> same bytes
    return buffer.getvalue()


def _render_story(job: tuple[str, int, int, int, int]) -> tuple[object, dict[str, bytes]]:
    """One story and its frames as PNG bytes (a pure function of the job: any process may render it)."""
    split, index, seed, frames, size = job
    story = generate_story(seed, story_id(split, index), frames=frames)
    pngs = {
        f"{split}/{story.id}/{story.id}_{frame:03d}.png": _png_bytes(render_frame(story, frame, size=size))
        for frame in range(frames)
    }
    return story, pngs


def _story_renderer(workers: int, total: int):
    """`map` over render jobs, in order: this process for small sets, else a pool of spawned processes (the
    `small` preset's 2,200 stories at 128 px take about 14 min on one core). Every story is a pure function of its
    seed, so the data set is byte-for-byte the same whatever the count."""
    if workers <= 1 or total < PARALLEL_FROM:
        return contextlib.nullcontext(map)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _closing_map(pool)


@contextlib.contextmanager
def _closing_map(pool: ProcessPoolExecutor):
    with pool:
        yield functools.partial(pool.map, chunksize=4)


def make_dataset(
    out: Path | str, config: MakeConfig, overwrite: bool = False, progress: bool = True, workers: int | None = None
) -> dict:
    """Generate, render and write a whole data set; the folder appears only when complete. `workers` processes
    render the stories (default: the machine's cores; the result does not depend on it)."""
    config.check()
    out = Path(out)
    seeds = {split: [story_seed(config.seed, split, i) for i in range(config.stories(split))] for split in SPLITS}
    all_seeds = [s for split in SPLITS for s in seeds[split]]
    assert len(set(all_seeds)) == len(all_seeds), "story seeds collided across splits"
    total = sum(config.stories(split) for split in SPLITS)
    workers = workers if workers is not None else os.cpu_count() or 1
    with (
        build_directory(out, overwrite=overwrite) as tmp,
        tqdm(total=total, desc="stories", unit="story", disable=not progress) as bar,
        _story_renderer(workers, total) as render_all,
    ):
        train_captions: list[str] = []
        for split in SPLITS:
            records, annotations = [], []
            jobs = [(split, index, seed, config.frames, config.size) for index, seed in enumerate(seeds[split])]
            for story, pngs in render_all(_render_story, jobs):
                for relative, png in pngs.items():
                    target = tmp / "images" / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(png)
                records.append(StoryRecord(story.id, list(pngs), list(story.captions), list(range(config.frames))))
                annotations.append(json.dumps(annotation_line(story)) + "\n")
                if split == "train":
                    train_captions.extend(story.captions)
                bar.update(1)
            write_jsonl(tmp / f"{split}.jsonl", records)
            write_text(tmp / f"{split}.annotations.jsonl", "".join(annotations))
        tokenizer = StoryTokenizer.train(train_captions, merges=config.bpe_merges, num_image_tokens=config.image_tokens)
        tokenizer.save_pretrained(tmp / "tokenizer")
        metadata = {
            "format": "storystream",
            "generator": "storystream-mini",
            "version": FORMAT_VERSION,
            "config": asdict(config),
            "splits": {s: config.stories(s) for s in SPLITS},
            "image_root": "images",
            "tokenizer": "tokenizer",
        }
        write_text(tmp / "dataset.json", json.dumps(metadata, indent=2) + "\n")
    return metadata


@dataclass
class StorySplit:
    """One split of a data set: its stories, their ground truth, and where the images are."""

    root: Path
    split: str
    records: list[StoryRecord]
    annotations: dict[str, dict]  # story id -> annotation line

    def image(self, story: int, frame: int) -> Image.Image:
        with Image.open(image_file(self.root / "images", self.records[story].images[frame])) as image:
            return image.convert("RGB")

    def story_index(self, story_id: str) -> int:
        for index, record in enumerate(self.records):
            if str(record.id) == str(story_id):
                return index
        raise LabError(f"{self.root / (self.split + '.jsonl')}: no story with id {story_id!r}")


def open_split(root: Path | str, split: str = "train") -> StorySplit:
    """Open one split of a labkit data set folder (records + annotations)."""
    root = Path(root)
    if split not in SPLITS:
        raise ParameterError("split", f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not (root / "dataset.json").is_file():
        raise LabError(
            f"{root}: not a labkit data set (no dataset.json); make one with `labkit data make --out {root}`"
        )
    records = read_jsonl(root / f"{split}.jsonl")
    annotations = {}
    sidecar = root / f"{split}.annotations.jsonl"
    if sidecar.is_file():
        for line in sidecar.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            annotations[str(entry["id"])] = entry
    return StorySplit(root, split, records, annotations)


def load_tokenizer(root: Path | str) -> StoryTokenizer:
    return StoryTokenizer.from_pretrained(Path(root) / "tokenizer")


def ensure_dataset(preset: Preset, progress: bool = True) -> Path:
    """The preset's StoryStream-mini data set, made once under artifacts/<preset>/ (about a minute at tiny)."""
    folder = artifacts_folder(preset.name) / "storystream-mini"
    if not (folder / "dataset.json").is_file():
        data = preset.data
        config = MakeConfig(
            train_stories=data.train_stories,
            val_stories=data.val_stories,
            test_stories=data.test_stories,
            frames=data.frames,
            size=data.image_size,
            seed=0,
            bpe_merges=data.bpe_merges,
            image_tokens=data.image_tokens,
        )
        make_dataset(folder, config, overwrite=True, progress=progress)
    return folder
