"""Plots the notebooks and the CLI share: story strips and the token layout drawn as a coloured strip."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image

from labkit.core.atomic import write_bytes
from labkit.core.errors import LabError
from labkit.data.frames import CHARACTER_NAMES, STYLE_NAMES
from labkit.data.storystream import StoryRecord, default_image_root, image_file, read_jsonl

# One colour per token type, used by every layout plot (legend in `plot_layout`).
TOKEN_COLOURS = {
    "bos": "#222222",
    "text": "#4c72b0",
    "boi": "#dd8452",
    "image": "#f2c14e",
    "eoi": "#c44e52",
    "eos": "#8172b3",
}


def find_story(path: Path, story_id: str, image_root: str | Path | None = None) -> tuple[StoryRecord, Path]:
    """Find a story by id in a jsonl file or in any split of a data set folder; return it and its image root."""
    files = (
        sorted(p for p in path.glob("*.jsonl") if not p.name.endswith(".annotations.jsonl"))
        if path.is_dir()
        else [path]
    )
    for file in files:
        root = Path(image_root) if image_root else default_image_root(file)
        for record in read_jsonl(file, image_root=root):  # refuses image paths that leave the root, naming the line
            if str(record.id) == str(story_id):
                return record, root
    raise LabError(f"{path}: no story with id {story_id!r}")


def story_strip(images: Sequence[Image.Image], columns: int = 10, gap: int = 2) -> Image.Image:
    """Tile frames in reading order, `columns` per row, on a white background."""
    if not images:
        raise LabError("story has no frames to show")
    width, height = images[0].size
    rows = -(-len(images) // columns)
    columns = min(columns, len(images))
    strip = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        strip.paste(image.convert("RGB").resize((width, height)), (column * (width + gap), row * (height + gap)))
    return strip


def save_story_strip(
    path: Path, story_id: str, out: str | Path | None = None, image_root: str | Path | None = None
) -> Path:
    """`labkit data show`: write a PNG strip of one story's frames; print its captions."""
    import io

    record, root = find_story(path, story_id, image_root)
    images = []
    for relative in record.images:
        file = image_file(root, relative)
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise LabError(f"{file}: cannot read image ({error})") from None
    for index, caption in enumerate(record.captions):
        print(f"{index:3d}  {caption}")
    target = Path(out) if out else Path(f"story_{story_id}.png")
    buffer = io.BytesIO()
    story_strip(images).save(buffer, format="PNG")
    write_bytes(target, buffer.getvalue())
    return target


def plot_story(
    images: Sequence[Image.Image], captions: Sequence[str], columns: int = 5, width: int = 28, axes_size: float = 2.2
):
    """A matplotlib figure of frames with their captions underneath (for notebooks)."""
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * axes_size, rows * (axes_size + 0.9)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, (image, caption) in enumerate(zip(images, captions)):
        axis = axes.flat[index]
        axis.imshow(image)
        axis.set_title(f"{index}", fontsize=8, loc="left")
        axis.text(
            0.5,
            -0.03,
            "\n".join(textwrap.wrap(caption, width)),
            transform=axis.transAxes,
            ha="center",
            va="top",
            fontsize=6.5,
        )
    figure.tight_layout()
    return figure


def plot_layout(
    token_types: Sequence[str],
    labels_on: Sequence[bool],
    slots_in: Sequence[bool],
    slots_out: Sequence[bool],
    title: str = "",
):
    """The token layout as a coloured strip: one cell per position, rows for type / text loss / image slots."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    n = len(token_types)
    rows = np.ones((4, n, 3))
    rows[0] = [to_rgb(TOKEN_COLOURS[kind]) for kind in token_types]
    rows[1][np.asarray(labels_on, bool)] = to_rgb("#55a868")
    rows[2][np.asarray(slots_in, bool)] = to_rgb("#64b5cd")
    rows[3][np.asarray(slots_out, bool)] = to_rgb("#c44e52")
    figure, axis = plt.subplots(figsize=(min(18, 5 + n / 25), 2.2))
    axis.imshow(rows, aspect="auto", interpolation="nearest")
    axis.set_yticks(range(4), ["token type", "text loss", "image input", "image output"])
    axis.set_xlabel("position")
    axis.set_title(title)
    handles = [Patch(color=c, label=k) for k, c in TOKEN_COLOURS.items()]
    axis.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return figure


def plot_image_rows(
    rows: dict, captions: dict | None = None, ok: dict | None = None, title: str = "", size: float = 1.25
):
    """Rows of images (a dict: row label -> uint8 [K, 3, H, W]) as one figure, the label left of each row.

    `captions[label][k]` is written under image k of that row, green or red when `ok[label][k]` is given (e.g.
    whether a judge agrees with the ground truth)."""
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(columns * size + 1.2, len(rows) * (size + (0.35 if captions else 0.1))),
        squeeze=False,
    )
    for r, (label, images) in enumerate(rows.items()):
        for k, axis in enumerate(axes[r]):
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if k < len(images):
                axis.imshow(images[k].permute(1, 2, 0).cpu().numpy())
                if captions and label in captions:
                    good = None if not ok or label not in ok else bool(ok[label][k])
                    axis.set_xlabel(
                        captions[label][k],
                        fontsize=6.5,
                        labelpad=2,
                        color="#222" if good is None else ("#2a7d2a" if good else "#c0392b"),
                    )
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def judge_captions(judges, images, protagonist, style) -> tuple[list[str], list[bool]]:
    """Captions for `plot_image_rows`: what the judges see in each image (character, style), and whether both
    match the ground truth labels."""
    character, drawn = judges.predict_character(images), judges.predict_style(images)
    captions = [f"{CHARACTER_NAMES[c]}\n{STYLE_NAMES[s]}" for c, s in zip(character.tolist(), drawn.tolist())]
    return captions, ((character == protagonist) & (drawn == style)).tolist()
