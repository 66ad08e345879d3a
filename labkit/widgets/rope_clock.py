"""The RoPE clock (paper §3.3, StreamingLLM's position shift): what evicting entries does to a held key.

Llama rotates every key and query by its position before the dot product, so q·k depends only on their distance.
Evict `shift` entries before a held key and the query now sits `shift` slots earlier:

- a re-rotating cache (StreamingLLM, the lab's `sink` and `mm-sink`) rotates the key to its new slot as well, so
  the distance, and q·k, are what they were (up to float rounding);
- the official sink as coded (`src/inference/vis_george_sink.py`, the lab's `mm-sink-as-coded`) keeps the key's
  old rotation: the distance it encodes is off by `shift`, and q·k drifts as the shift grows.

The numbers come from `labkit.caches.rope.Rotary`, the rotation the lab's caches use, with the tiny MLLM's RoPE.
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.caches.rope import Rotary
from labkit.core.presets import get_preset
from labkit.models.mllm import llm_config
from labkit.widgets.common import PlotArea, explorer, parse_int

MAX_POSITION = 1024


def rope_scores(
    rotary: Rotary, query: torch.Tensor, key: torch.Tensor, key_position: int, distance: int, shifts: np.ndarray
) -> dict[str, np.ndarray]:
    """q·k for each eviction `shift`: `true` (no eviction), `rerotated` (key moved to its new slot), `stale`
    (key kept with its old rotation, query at its new place)."""
    if distance < 1:
        raise ValueError(f"distance: the query must come after the key (got {distance})")
    if shifts.max(initial=0) > key_position:
        raise ValueError(
            f"shift: only entries before the key can be evicted: at most {key_position} (got {shifts.max()})"
        )
    cos, sin = rotary.table(key_position + distance + 1, torch.device("cpu"))

    def rotated(x: torch.Tensor, positions) -> torch.Tensor:
        positions = torch.as_tensor(positions)
        return Rotary.rotate(x.expand(len(positions), -1), cos[positions], sin[positions])

    true = float(rotated(query, [key_position + distance])[0] @ rotated(key, [key_position])[0])
    moved_queries = rotated(query, key_position + distance - torch.as_tensor(shifts))
    rerotated = (moved_queries * rotated(key, key_position - torch.as_tensor(shifts))).sum(-1)
    stale = moved_queries @ rotated(key, [key_position])[0]
    return {
        "shifts": shifts,
        "true": np.full(len(shifts), true),
        "rerotated": rerotated.numpy(),
        "stale": stale.numpy(),
    }


def plot_rope_clock(
    rotary: Rotary, query: torch.Tensor, key: torch.Tensor, key_position: int, distance: int, shift: int, pair: int
):
    """Left: pair `pair` of the key, as stored and re-rotated, and the query, on the unit circle. Right: q·k against
    the shift, with the current shift marked."""
    import matplotlib.pyplot as plt

    shifts = np.arange(0, key_position + 1, max(1, (key_position + 1) // 256))
    scores = rope_scores(rotary, query, key, key_position, distance, np.unique(np.append(shifts, shift)))
    frequency = float(rotary.inv_freq[pair])
    figure, (clock, curve) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    clock.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgrey"))
    arrows = (
        ("key as stored (as coded)", key_position, "#d62728"),
        ("key re-rotated to its slot", key_position - shift, "#2ca02c"),
        ("query at its slot", key_position + distance - shift, "#1f77b4"),
    )
    for label, position, colour in arrows:
        angle = position * frequency
        clock.annotate("", (np.cos(angle), np.sin(angle)), (0, 0), arrowprops={"arrowstyle": "->", "color": colour})
        clock.plot([], [], color=colour, label=f"{label}: position {position}")
    clock.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", xticks=[], yticks=[])
    clock.set_title(f"pair {pair}: {frequency:.3g} rad per position", fontsize=10)
    clock.legend(loc="lower center", bbox_to_anchor=(0.5, -0.32), fontsize=8)
    curve.plot(scores["shifts"], scores["stale"], color="#d62728", label="stale key (official code as coded)")
    curve.plot(scores["shifts"], scores["rerotated"], color="#2ca02c", label="re-rotated key (StreamingLLM)")
    curve.axhline(scores["true"][0], color="grey", ls=":", label="before eviction")
    curve.axvline(shift, color="black", lw=0.8)
    at = int(np.flatnonzero(scores["shifts"] == shift)[0])
    curve.set(xlabel="entries evicted before the key (shift)", ylabel="q·k")
    curve.set_title(
        f"shift {shift}: q·k {scores['true'][0]:+.3f} before, {scores['rerotated'][at]:+.3f} re-rotated, "
        f"{scores['stale'][at]:+.3f} stale",
        fontsize=10,
    )
    curve.legend(fontsize=8)
    figure.tight_layout()
    return figure


def rope_clock_explorer(preset: str = "tiny"):
    """Sliders for the key's position, the query's distance, the shift and the frequency pair; a seed box."""
    import ipywidgets as widgets

    rotary = Rotary(llm_config(get_preset(preset), vocab_size=256))
    head_dim = 2 * rotary.inv_freq.numel()
    controls = {
        "key_position": widgets.IntSlider(value=300, min=0, max=MAX_POSITION, description="key position"),
        "distance": widgets.IntSlider(value=20, min=1, max=256, description="query distance"),
        "shift": widgets.IntSlider(value=64, min=0, max=MAX_POSITION, description="shift"),
        "pair": widgets.IntSlider(value=2, min=0, max=head_dim // 2 - 1, description="RoPE pair"),
        "seed": widgets.Text(value="0", description="seed", continuous_update=False),
    }
    area = PlotArea()

    def draw():
        seed = parse_int(controls["seed"].value, "seed", 0, 2**31 - 1)
        generator = torch.Generator().manual_seed(seed)
        query, key = torch.randn(2, head_dim, generator=generator)
        values = {name: control.value for name, control in controls.items() if name != "seed"}
        return plot_rope_clock(rotary, query, key, **values)

    return explorer(controls, area, draw, [2, 3])
