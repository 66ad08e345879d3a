"""The StoryStream jsonl format, exactly as released with SEED-Story.

One story per line: ``{"id", "images": [paths], "captions": [texts], "orders": [ints]}``, image paths
relative to an image root (official layout: ``data/json/val.jsonl`` beside ``data/image/george_full``).
The official ``StoryStream/chunk_data.py`` cuts 30-frame stories into non-overlapping 10-frame chunks,
drops an incomplete tail, sets ``id`` to the index of the source story and drops ``orders``; so
``orders`` is optional when reading.

Reading is strict and reports *every* problem it finds, each as ``path:line: message``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from ..atomic import write_text
from ..errors import DataError, LabError, located


@dataclass
class StoryRecord:
    """One story (or chunk) of the StoryStream format."""

    id: str | int
    images: list[str]
    captions: list[str]
    orders: list[int] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def to_json(self) -> dict:
        line: dict = {"id": self.id, "images": self.images, "captions": self.captions}
        if self.orders is not None:
            line["orders"] = self.orders
        return line


@dataclass
class ValidationReport:
    """What `validate` found: the stories it read and every problem, located by path and line."""

    path: Path
    stories: int = 0
    frames: int = 0
    images_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_lines(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    """Split a file into (line number, text) pairs, reporting undecodable lines instead of failing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.append(located(path, None, "file not found"))
        return []
    except IsADirectoryError:
        problems.append(located(path, None, "is a folder, expected a .jsonl file"))
        return []
    if not raw.strip():
        problems.append(located(path, None, "file is empty (expected one JSON story per line)"))
        return []
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(located(path, number, f"not valid UTF-8 (byte {error.start}: {chunk[error.start:error.start + 1]!r})"))
            continue
        if text.strip():
            lines.append((number, text))
    return lines


def _parse_record(path: Path, number: int, text: str, problems: list[str]) -> StoryRecord | None:
    """Parse and check one line's structure; return None (with problems added) when it is unusable."""
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        problems.append(located(path, number, f"malformed JSON ({error.msg} at column {error.colno})"))
        return None
    if not isinstance(line, dict):
        problems.append(located(path, number, f"expected a JSON object, got {type(line).__name__}"))
        return None
    before = len(problems)
    for key in ("id", "images", "captions"):
        if key not in line:
            problems.append(located(path, number, f"missing key '{key}'"))
    images, captions, orders = line.get("images"), line.get("captions"), line.get("orders")
    if "images" in line and not (isinstance(images, list) and all(isinstance(x, str) for x in images)):
        problems.append(located(path, number, "'images' must be a list of path strings"))
    if "captions" in line and not (isinstance(captions, list) and all(isinstance(x, str) for x in captions)):
        problems.append(located(path, number, "'captions' must be a list of strings"))
    if orders is not None and not (isinstance(orders, list) and all(isinstance(x, int) for x in orders)):
        problems.append(located(path, number, "'orders' must be a list of integers"))
    if len(problems) > before:
        return None
    if len(images) != len(captions):
        problems.append(located(path, number, f"'images' has {len(images)} entries but 'captions' has {len(captions)}"))
        return None
    if orders is not None and len(orders) != len(images):
        problems.append(located(path, number, f"'orders' has {len(orders)} entries but 'images' has {len(images)}"))
        return None
    if not images:
        problems.append(located(path, number, "story has no frames"))
        return None
    return StoryRecord(id=line["id"], images=images, captions=captions, orders=orders)


def read_jsonl(path: Path | str) -> list[StoryRecord]:
    """Read a StoryStream jsonl file; raise `DataError` listing every problem (structure only, no images)."""
    path = Path(path)
    problems: list[str] = []
    records = [r for n, t in _decode_lines(path, problems) if (r := _parse_record(path, n, t, problems))]
    if problems:
        raise DataError(problems)
    return records


def write_jsonl(path: Path | str, records: Iterable[StoryRecord]) -> None:
    """Write records, one compact JSON object per line, atomically."""
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
    write_text(path, text)


def check_image(file: Path) -> str | None:
    """Return None if `file` is a complete, decodable image, else what is wrong with it."""
    if not file.is_file():
        return "image file not found"
    try:
        with Image.open(file) as image:
            image.verify()  # structure and checksums
        with Image.open(file) as image:
            image.load()  # decodes every pixel: catches truncated files that verify() lets through
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, SyntaxError, ValueError) as error:
        return f"damaged image ({error})"
    return None


def default_image_root(jsonl: Path) -> Path:
    """Where images live when the user names none: `images/` beside the file (labkit's layout), else its folder."""
    beside = jsonl.parent / "images"
    return beside if beside.is_dir() else jsonl.parent


def validate(path: Path | str, image_root: Path | str | None = None, check_images: bool = True) -> ValidationReport:
    """Check a jsonl file (structure, lengths, and every image) and report all problems found."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else default_image_root(path)
    report = ValidationReport(path=path)
    for number, text in _decode_lines(path, report.problems):
        record = _parse_record(path, number, text, report.problems)
        if record is None:
            continue
        report.stories += 1
        report.frames += len(record)
        if not check_images:
            continue
        for image in record.images:
            problem = check_image(root / image)
            report.images_checked += 1
            if problem:
                report.problems.append(located(path, number, f"{problem}: {root / image}"))
    return report


def chunk_stories(records: Iterable[StoryRecord], length: int = 10) -> list[StoryRecord]:
    """Cut stories into non-overlapping chunks of `length` frames, as the official `chunk_data.py`.

    The incomplete tail is dropped, a chunk's `id` is the index of its source story, and `orders` is
    dropped (all as the official script does).
    """
    if length < 2:
        raise LabError(f"parameter --length: must be at least 2 (got {length})")
    chunks = []
    for index, record in enumerate(records):
        for start in range(0, len(record) - length + 1, length):
            stop = start + length
            chunks.append(StoryRecord(id=index, images=record.images[start:stop], captions=record.captions[start:stop]))
    return chunks


def chunk_file(source: Path | str, destination: Path | str, length: int = 10) -> int:
    """Chunk a jsonl file into another; returns the number of chunks written."""
    chunks = chunk_stories(read_jsonl(source), length)
    write_jsonl(destination, chunks)
    return len(chunks)
