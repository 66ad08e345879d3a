"""Where the model's BOS sink sits, layer by layer, and what evicting it costs (notebooks 04 and 05).

Reads the `bos_ratio` blocks of the `lm` and `mllm` manifests and the JSON that `labkit sink-check` writes
(`reports/<preset>/sink_check.json`). A BOS ratio is the attention from queries past position 32 to `<s>`,
divided by what uniform attention would give it: 1 means no preference, a sink is many times that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

Panels = dict[str, dict[str, Sequence[float]]]  # panel title -> bar label -> one ratio per layer

MANIFEST_PROBES = {
    "captions_before_stage2": "captions, before stage 2",
    "captions_after_stage2": "captions, after stage 2",
    "multimodal_after_stage2": "multimodal, after stage 2",
}
CHECK_POLICIES = ("dense", "window", "sink", "mm-sink")


def manifest_panels(lm_manifest: dict | None, mllm_manifest: dict | None, statistic: str = "mean_over_heads") -> Panels:
    """BOS ratio per layer from the manifests: the LM after pre-training (story captions and Bigram-Backcopy text)
    and the MLLM (captions before and after stage 2, multimodal samples after it). `statistic`: "mean_over_heads"
    or "strongest_head". A manifest without `bos_ratio` gives no panel."""
    panels: Panels = {}
    lm = (lm_manifest or {}).get("bos_ratio") or {}
    probes = {"captions": "story captions", "backcopy": "Bigram-Backcopy text"}
    if lm:
        panels["pre-trained LM (lm manifest)"] = {probes[k]: lm[k][statistic] for k in probes if k in lm}
    mllm = (mllm_manifest or {}).get("bos_ratio") or {}
    if mllm:
        panels["MLLM (mllm manifest)"] = {
            label: mllm[key][statistic] for key, label in MANIFEST_PROBES.items() if key in mllm
        }
    return panels


def layers_with_sink(ratios: Sequence[float], level: float) -> list[int]:
    """The layers whose BOS ratio is at least `level`."""
    return [layer for layer, ratio in enumerate(ratios) if ratio >= level]


def plot_bos_layers(panels: Panels, sink_level: float, title: str = ""):
    """Grouped bars, one group per layer and one bar per probe, on a log scale shared by the panels; dotted at 1
    (uniform attention), dashed red at `sink_level` (what the lab calls a sink)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.4), sharey=True, squeeze=False)
    for axis, (name, bars) in zip(axes[0], panels.items()):
        width = 0.8 / max(len(bars), 1)
        for k, (label, ratios) in enumerate(bars.items()):
            x = np.arange(len(ratios)) + (k - (len(bars) - 1) / 2) * width
            shown = axis.bar(x, ratios, width, label=label)
            axis.bar_label(shown, [f"{r:.1f}" for r in ratios], fontsize=6.5, padding=1)
        axis.axhline(1, color="grey", lw=0.8, ls=":")
        axis.axhline(sink_level, color="#c0392b", lw=0.8, ls="--", label=f"sink level ({sink_level:g}x)")
        layers = max(len(r) for r in bars.values())
        axis.set_xticks(range(layers), [f"layer {i}" for i in range(layers)])
        axis.set(yscale="log", title=name)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("BOS attention / uniform")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def read_sink_check(path: Path | str) -> dict | None:
    """The evidence `labkit sink-check --out` wrote, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def sink_check_panels(evidence: dict) -> Panels:
    """The check's BOS ratio per layer (mean over heads), on full multimodal test stories and on their captions
    fed as plain text to the MLLM's saved language model, for `plot_bos_layers`."""
    return {
        f"{evidence['stories']} test stories (labkit sink-check)": {
            "multimodal stories": evidence["bos_multimodal"]["mean_over_heads"],
            "captions as plain text": evidence["bos_plain_captions"]["mean_over_heads"],
        }
    }


def sink_check_ratios(evidence: dict, window_target: float, flat_target: float) -> list[dict]:
    """The check's NLL ratios with their targets: window over sink beyond the training length (a sink matters:
    at least `window_target`), and sink and mm-sink beyond over within (they stay flat: at most `flat_target`)."""
    rows = [
        ("window / sink, beyond", evidence["window_over_sink_beyond"], window_target, ">="),
        ("sink, beyond / within", evidence["sink_beyond_over_within"], flat_target, "<="),
        ("mm-sink, beyond / within", evidence["mm_sink_beyond_over_within"], flat_target, "<="),
    ]
    return [
        {"ratio": name, "value": value, "target": target, "rule": rule, "met": _met(value, target, rule)}
        for name, value, target, rule in rows
    ]


def _met(value: float, target: float, rule: str) -> bool:
    return value >= target if rule == ">=" else value <= target


def plot_sink_check_nll(evidence: dict, window_target: float, flat_target: float):
    """Left: caption NLL within the training length and after the first eviction, per policy (dots: each story
    beyond). Right: the ratios the targets are about, green where met and red where not, each target dashed."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    forced = evidence["teacher_forced"]
    policies = [p for p in CHECK_POLICIES if p in forced]
    x = np.arange(len(policies))
    left.bar(x - 0.2, [forced[p]["nll_within"] for p in policies], 0.4, label="within the training length")
    left.bar(x + 0.2, [forced[p]["nll_beyond"] for p in policies], 0.4, label="after the first eviction")
    for i, policy in enumerate(policies):
        stories = forced[policy].get("per_story_beyond") or []
        left.plot(np.full(len(stories), i + 0.2), stories, ".", color="black", ms=4)
    left.set_xticks(x, policies)
    left.set(ylabel="caption NLL (nats/token)", title=f"teacher-forced, window {evidence['window_tokens']} tokens")
    left.legend(fontsize=7)
    rows = sink_check_ratios(evidence, window_target, flat_target)
    colours = ["#2a7d2a" if row["met"] else "#c0392b" for row in rows]
    right.bar(range(len(rows)), [row["value"] for row in rows], 0.6, color=colours)
    for i, row in enumerate(rows):
        right.hlines(row["target"], i - 0.4, i + 0.4, color="black", ls="--", lw=1)
        right.text(i, row["value"] / 2, f"{row['value']:.2f}x", ha="center", color="white", fontsize=8)
    right.axhline(1, color="grey", lw=0.8, ls=":")
    labels = [f"{row['ratio']}\ntarget {row['rule']} {row['target']:g}" for row in rows]
    right.set_xticks(range(len(rows)), labels, fontsize=8)
    right.set(title="the ratios and their targets (dashed; green: met)", ylabel="ratio of caption NLL")
    figure.tight_layout()
    return figure
