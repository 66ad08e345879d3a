"""Plots of the long-story ablation (notebooks 07 and 08): story strips, per-segment curves, time and memory."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import torch

from labkit.experiments.story_ablation import strip_segments

CURVES = (
    ("char_acc", "character accuracy (judge)"),
    ("style_consistency", "style consistency (judge)"),
    ("clip", "CLIP-analogue (image-caption)"),
    ("lpips_consecutive", "LPIPS to the previous frame"),
)


def plot_story_strip(images: torch.Tensor, captions: list[list[str]], title: str = "", rows: int = 2):
    """Stories (rows) at segments 1, 10, 25 (and the last one when longer), each with its caption."""
    picks = strip_segments(images.shape[1])
    rows = min(rows, images.shape[0], len(captions))
    figure, axes = plt.subplots(rows, len(picks), figsize=(3.0 * len(picks), 3.3 * rows), squeeze=False)
    for r in range(rows):
        for c, segment in enumerate(picks):
            axis = axes[r][c]
            axis.imshow(images[r, segment - 1].permute(1, 2, 0).numpy())
            axis.set_title(f"story {r + 1}, segment {segment}", fontsize=9)
            axis.set_xlabel("\n".join(textwrap.wrap(captions[r][segment - 1], 34)[:3]), fontsize=7)
            axis.set_xticks([]), axis.set_yticks([])
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_story(images: torch.Tensor, captions: list[str], columns: int = 5, title: str = ""):
    """A whole story: every segment's image [S, 3, H, W] with its caption, `columns` per row."""
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.3 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([]), axis.set_yticks([])
        if index >= len(images):
            axis.axis("off")
            continue
        axis.imshow(images[index].permute(1, 2, 0).numpy())
        axis.set_title(f"segment {index + 1}", fontsize=8)
        axis.set_xlabel("\n".join(textwrap.wrap(captions[index], 30)[:3]), fontsize=6)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_segment_curves(curves: dict[str, dict], title: str = "", training_segments: int = 10):
    """Per-segment judge metrics, one line per entry of `curves` (name -> a record's `per_segment`)."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2))
    for axis, (key, label) in zip(axes, CURVES):
        for name, per_segment in curves.items():
            values = [float("nan") if v is None else v for v in per_segment[key]]
            axis.plot(range(1, len(values) + 1), values, marker=".", label=name)
        axis.axvline(training_segments, color="grey", linestyle=":", linewidth=1)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("segment")
    axes[0].legend(fontsize=8)
    figure.suptitle(title + " (dotted: the longest story seen in training)")
    figure.tight_layout()
    return figure


def plot_cost(timings: dict[str, dict], title: str = ""):
    """Seconds and KV-cache megabytes per segment, one line per entry (name -> a record's `timings`)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    for name, timing in timings.items():
        segments = range(1, len(timing["seconds"]) + 1)
        left.plot(list(segments)[1:], timing["seconds"][1:], marker=".", label=name)
        right.plot(segments, [b / 1e6 for b in timing["kv_bytes"]], marker=".", label=name)
    left.set(title="seconds to write a segment", xlabel="segment", ylabel="s")
    right.set(title="KV cache held after the segment", xlabel="segment", ylabel="MB")
    left.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
