"""The KV-cache explorer: which story positions each policy holds after each segment (paper §3.3, Fig. 5).

A random tiny model writes the story (`labkit.experiments.cache_trace`: eviction depends on the layout and the
policy, not on the weights), so the explorer runs anywhere in seconds. `budget="matched"` gives window and sink
as many entries as mm-sink's cap, the report's matched-budget row (`story_ablation.matched_window`).
"""

from __future__ import annotations

from labkit.experiments.story_ablation import MATCHED_POLICIES, CellConfig, matched_window
from labkit.inference.generate import STRATEGIES
from labkit.viz.sinks import cached_trace, plot_occupancy
from labkit.widgets.common import PlotArea, explorer


def occupancy_figure(policy: str, window: int, sink: int, cap: int, segment: int, budget: str, segments: int):
    """The occupancy plot of one setting; ValueError naming the control for settings no cache can hold."""
    if budget == "matched" and policy in MATCHED_POLICIES:
        window = matched_window(CellConfig(policy=policy, sink=sink, cap=cap, budget=budget))
    if policy in ("sink", "mm-sink", "mm-sink-stale") and window < sink:
        raise ValueError(f"window: must be at least the sink size ({sink}), got {window}")
    if not 0 <= segment < segments:
        raise ValueError(f"segment: must be in 0..{segments - 1} (got {segment})")
    trace = cached_trace(policy, segments, window, sink, max(cap, sink + window))
    return plot_occupancy(trace, segment)


def kv_cache_explorer(segments: int = 25):
    """Policy, budget, window, sink, cap and a segment slider."""
    import ipywidgets as widgets

    controls = {
        "policy": widgets.Dropdown(options=list(STRATEGIES), value="mm-sink", description="policy"),
        "budget": widgets.ToggleButtons(options=["training", "matched"], value="training", description="budget"),
        "window": widgets.IntSlider(value=128, min=16, max=512, step=16, description="window"),
        "sink": widgets.IntSlider(value=4, min=1, max=16, description="sink"),
        "cap": widgets.IntSlider(value=256, min=32, max=1024, step=32, description="cap"),
        "segment": widgets.IntSlider(value=segments - 1, min=0, max=segments - 1, description="segment"),
    }
    area = PlotArea()

    def draw():
        values = {name: control.value for name, control in controls.items()}
        return occupancy_figure(**values, segments=segments)

    return explorer(controls, area, draw, [2, 2, 2])
