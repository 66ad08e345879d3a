"""The StoryStream jsonl format, exactly as released with SEED-Story.

One story per line: ``{"id", "images": [paths], "captions": [texts], "orders": [ints]}``, image paths
relative to an image root (official layout: ``data/json/val.jsonl`` beside ``data/image/george_full``).
The official ``StoryStream/chunk_data.py`` cuts 30-frame stories into non-overlapping 10-frame chunks,
drops an incomplete tail, sets ``id`` to the index of the source story and drops ``orders``; so
``orders`` is optional when reading.

Reading is strict and reports *every* problem it finds, each as ``path:line: message``. An image path must stay
inside the image root: an absolute path (``/etc/passwd``) or one that climbs out (``../../etc/passwd``) is refused
when the file is read, and every join of root and path goes through `image_file`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from labkit.core.atomic import write_text
from labkit.core.errors import DataError, LabError, located


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
            byte = chunk[error.start : error.start + 1]
            problems.append(located(path, number, f"not valid UTF-8 (byte {error.start}: {byte!r})"))
            continue
        if text.strip():
            lines.append((number, text))
    return lines


def _parse_record(path: Path, number: int, text: str, problems: list[str], root: Path) -> StoryRecord | None:
    """Parse and check one line's structure (image paths inside `root` included); None (with problems) if unusable."""
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
    escapes = [problem for image in images if (problem := image_path_problem(root, image, resolve=False))]
    if escapes:
        problems += [located(path, number, problem) for problem in escapes]
        return None
    return StoryRecord(id=line["id"], images=images, captions=captions, orders=orders)


def read_jsonl(path: Path | str, image_root: Path | str | None = None) -> list[StoryRecord]:
    """Read a StoryStream jsonl file; raise `DataError` listing every problem (structure only, no images).

    An image path that is absolute or climbs out of the image root (`image_root`, default `default_image_root`,
    named in the message) is a problem of the structure: it is refused here, before anything opens it."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else default_image_root(path)
    problems: list[str] = []
    records = [r for n, t in _decode_lines(path, problems) if (r := _parse_record(path, n, t, problems, root))]
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
    beside = Path(jsonl).parent / "images"
    return beside if beside.is_dir() else Path(jsonl).parent


def image_path_problem(root: Path | str, image: str, resolve: bool = True) -> str | None:
    """None if the record's image path `image` stays inside the image root `root`, else what is wrong with it.

    Refused: an absolute path (POSIX `/x`, Windows `C:\\x` or `\\\\server\\x`), and one whose location leaves
    the root: `..` climbing out (a backslash counts as a separator, as on Windows) and, with `resolve`, a symbolic
    link inside the root that points outside it (this one needs the file system; the `..` check does not)."""
    root = Path(root)
    text = image.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(image).drive or PureWindowsPath(image).root:
        return f"image path {image!r} leaves the image root {root} (it is absolute; paths are relative to the root)"
    if posixpath.normpath(text).split("/")[0] == "..":
        return f"image path {image!r} leaves the image root {root}"
    if resolve:
        target = (root / image).resolve()
        if not target.is_relative_to(root.resolve()):
            return f"image path {image!r} leaves the image root {root} (it resolves to {target})"
    return None


def image_file(root: Path | str, image: str, path: Path | str | None = None, line: int | None = None) -> Path:
    """The file of a record's image path under the image root: the one way labkit joins the two.

    Raises `DataError` located at `path:line` (the jsonl file and the story's line, when given) if the path is
    absolute or leaves the root (`image_path_problem`)."""
    problem = image_path_problem(root, image)
    if problem:
        raise DataError([located(path, line, problem) if path is not None else problem])
    return Path(root) / image


def validate(path: Path | str, image_root: Path | str | None = None, check_images: bool = True) -> ValidationReport:
    """Check a jsonl file (structure, lengths, and every image) and report all problems found."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else default_image_root(path)
    report = ValidationReport(path=path)
    for number, text in _decode_lines(path, report.problems):
        record = _parse_record(path, number, text, report.problems, root)
        if record is None:
            continue
        report.stories += 1
        report.frames += len(record)
        if not check_images:
            continue
        for image in record.images:
            try:
                file = image_file(root, image, path, number)
            except DataError as error:  # a symbolic link out of the root: one problem among the others
                report.problems += error.problems
                continue
            problem = check_image(file)
            report.images_checked += 1
            if problem:
                report.problems.append(located(path, number, f"{problem}: {file}"))
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
