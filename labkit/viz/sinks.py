"""Plots of the attention-sink notebook: KV occupancy, the RoPE clock, long-context curves, attention by key
type (the interactive explorers built on them live in `labkit.widgets`). They read the `labkit trace-cache` JSON
and the evaluation dictionaries, so the CLI, the notebook, the explorers and the report show the same data."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from labkit.experiments.cache_trace import policy_params, trace_cache
from labkit.viz.plots import TOKEN_COLOURS


def occupancy_matrix(trace: dict) -> np.ndarray:
    """[segments, story positions]: 1 where the cache holds the position after that segment, 0 where evicted,
    NaN where the story had not reached it yet."""
    steps = trace["steps"]
    total = len(trace["token_ids"])
    matrix = np.full((len(steps), total), np.nan)
    ends = _segment_ends(trace)
    for row, step in enumerate(steps):
        matrix[row, : ends[row]] = 0.0
        matrix[row, [p for p in step["kept_positions"] if p < total]] = 1.0
    return matrix


def _segment_ends(trace: dict) -> list[int]:
    """Story length after each segment (each segment ends with `</img>`)."""
    ends = [i + 1 for i, kind in enumerate(trace["token_types"]) if kind == "eoi"]
    return ends[: len(trace["steps"])]


def plot_occupancy(trace: dict, segment: int | None = None, axis=None):
    """Token types along the story, dimmed where the cache no longer holds them (after `segment`)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    matrix = occupancy_matrix(trace)
    row = len(matrix) - 1 if segment is None else min(segment, len(matrix) - 1)
    colours = np.array([to_rgb(TOKEN_COLOURS.get(kind, "#999999")) for kind in trace["token_types"]])
    kept = matrix[row]
    image = np.ones((2, len(kept), 3))
    image[0] = colours
    image[1] = np.where(np.isnan(kept)[:, None], 1.0, np.where(kept[:, None] == 1, colours, 0.88))
    if axis is None:
        _, axis = plt.subplots(figsize=(14, 1.6))
    axis.imshow(image, aspect="auto", interpolation="nearest")
    axis.set_yticks([0, 1], ["story", "in cache"])
    step = trace["steps"][row]
    axis.set_title(
        f"{trace['policy']} {trace['params']}: after segment {step['segment']}, {len(step['kept_positions'])} entries, "
        f"{step['kv_bytes'] / 1024:.0f} KiB",
        fontsize=9,
    )
    axis.set_xlabel("story position")
    return axis


def plot_occupancy_over_time(traces: Sequence[dict]):
    """One panel per policy: rows are segments, columns story positions (held = dark)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(traces), 1, figsize=(14, 1.3 * len(traces) + 0.6), squeeze=False)
    for axis, trace in zip(axes[:, 0], traces):
        matrix = occupancy_matrix(trace)
        axis.imshow(
            np.nan_to_num(matrix, nan=-0.4), aspect="auto", interpolation="nearest", cmap="Greys", vmin=-0.5, vmax=1
        )
        axis.set_ylabel(trace["policy"], rotation=0, ha="right", fontsize=9)
        axis.set_yticks([])
    axes[-1, 0].set_xlabel("story position (dark: held in the cache after each segment, one row per segment)")
    figure.tight_layout()
    return figure


def rope_clock(trace: dict, theta: float = 10000.0, head_dim: int = 32) -> dict:
    """Rotation carried by each held key vs the rotation its slot should have, after the last segment.

    A re-rotating cache (StreamingLLM) gives held key i the angle of slot i; the official sink as coded
    keeps each key with the rotation it got when computed (the cache length then) while new queries sit at
    position n = held entries: after evictions those distances are wrong, some even negative.
    """
    step = trace["steps"][-1]
    slots = np.arange(len(step["kept_positions"]))
    query = len(slots)  # the next query's position: right after the held entries
    carried = np.asarray(step["rotation_positions"])
    frequency = theta ** (-2 * 0 / head_dim)  # the fastest-turning pair: angle = position × 1 rad
    slowest = theta ** (-2 * (head_dim // 2 - 1) / head_dim)
    return {
        "slots": slots,
        "carried": carried,
        "query": query,
        "distance_error": (query - carried) - (query - slots),
        "angle_fast": (carried * frequency) % (2 * math.pi),
        "angle_slow": carried * slowest,
    }


def plot_rope_clock(traces: Sequence[dict]):
    """Left: the position each held key was rotated with, against its slot. Right: error of query-key distances."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for trace in traces:
        clock = rope_clock(trace)
        axes[0].plot(
            clock["slots"], clock["carried"], ".", ms=3, label=f"{trace['policy']} (query at {clock['query']})"
        )
        axes[1].plot(clock["slots"], clock["distance_error"], ".", ms=3, label=trace["policy"])
    axes[0].plot([0, axes[0].get_xlim()[1]], [0, axes[0].get_xlim()[1]], color="grey", lw=0.8, ls=":")
    axes[0].set(
        xlabel="cache slot",
        ylabel="position the key's RoPE encodes",
        title="RoPE clock: where each held key thinks it is",
    )
    axes[1].set(xlabel="cache slot", ylabel="distance seen - distance meant", title="error in query-key distance")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_long_context(curves: dict, training_segments: int = 10, title: str = ""):
    """Per-segment NLL and cosine error for each policy (the attention_sinks curve, story edition)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    for policy, curve in curves.items():
        x = np.arange(len(curve["nll"]))
        axes[0].plot(x, curve["nll"], label=policy)
        axes[1].plot(x, curve["cosine_error"], label=policy)
        axes[2].plot(x, curve["kv_entries"], label=policy)
    for axis, name in zip(axes, ("caption NLL (nats/token)", "image feature cosine error", "KV entries")):
        axis.axvline(training_segments - 0.5, color="grey", lw=0.8, ls=":")
        axis.set(xlabel="segment", title=name)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def flatness(curves: dict, training_segments: int = 10, tolerance: float = 0.10) -> dict[str, dict]:
    """Does each policy stay flat past the training length? Mean NLL after it vs within it (segments 1..L-1)."""
    verdicts = {}
    for policy, curve in curves.items():
        nll = np.asarray(curve["nll"], dtype=float)
        within, beyond = np.nanmean(nll[1:training_segments]), np.nanmean(nll[training_segments:])
        ratio = beyond / within
        verdicts[policy] = {
            "within": float(within),
            "beyond": float(beyond),
            "ratio": float(ratio),
            "verdict": "flat" if ratio <= 1 + tolerance else ("degrades" if ratio <= 1.5 else "collapses"),
        }
    return verdicts


def plot_sink_ratios(
    ratios: dict,
    kinds: Sequence[str] = ("bos", "punct", "boi", "image_head", "image_tail", "eoi", "after_eoi", "inst", "text"),
):
    """Heat map: layers × key types, attention relative to uniform (1 = no preference)."""
    import matplotlib.pyplot as plt

    table = np.stack([ratios[k].mean(1).numpy() for k in kinds], axis=1)
    figure, axis = plt.subplots(figsize=(1.0 * len(kinds) + 2, 0.45 * table.shape[0] + 1.4))
    shown = axis.imshow(np.log2(np.maximum(table, 1e-3)), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    for (layer, column), value in np.ndenumerate(table):
        axis.text(column, layer, f"{value:.1f}", ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(kinds)), kinds, rotation=30)
    axis.set_yticks(range(table.shape[0]), [f"layer {i}" for i in range(table.shape[0])])
    figure.colorbar(shown, label="log2(attention / uniform)")
    axis.set_title("attention by key type, relative to uniform (head mean)")
    figure.tight_layout()
    return figure


@lru_cache(maxsize=64)
def cached_trace(policy: str, segments: int, window: int, sink: int, cap: int, caption_tokens: int = 8) -> dict:
    """Random-model traces for the KV-occupancy widget, computed once per setting."""
    params = policy_params(policy, window=window, sink=sink, cap=cap)
    return trace_cache(policy, segments, params=params, caption_tokens=caption_tokens)
