"""What the report's verdicts rest on (notebooks 07 and 08): one cell's units, and each finding's paired
difference with its 95% interval drawn as a forest plot.

A unit is one (seed, story) continued under a cell's policy (`metrics.units` of the cell's metrics.json);
teacher-forced scores are per story (`metrics.teacher_forced.per_story`), the same under every seed. The report
pairs units across cells and bootstraps the differences (`labkit.report.comparisons`).
"""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from labkit.report.comparisons import LABELS

VERDICT_COLOURS = {"reproduced": "#2a7d2a", "contradicted": "#c0392b", "inconclusive": "#7f7f7f"}
EXTRA_LABELS = {
    "kv_entries": "KV entries at segment 25",
    "seconds_per_token": "relative speed-up (seconds per token)",
    "seconds_per_segment": "relative speed-up (seconds per segment)",
}


def metric_label(metric: str) -> str:
    """The report's name for a metric."""
    return LABELS.get(metric) or EXTRA_LABELS.get(metric) or metric.replace("_", " ")


def _number(value) -> float:
    return math.nan if value is None else float(value)


def unit_rows(record: dict) -> list[dict]:
    """One row per unit of a cell record: seed, story, the unit's judge scores and its story's teacher-forced
    scores (deterministic, so the same under every seed; absent when the cell did not teacher-force)."""
    units = record["metrics"].get("units") or {}
    per_story = (record["metrics"].get("teacher_forced") or {}).get("per_story") or {}
    forced = {row["story"]: row for row in (dict(zip(per_story, values)) for values in zip(*per_story.values()))}
    rows = [dict(zip(units, values)) for values in zip(*units.values())]
    return [{**row, **{k: v for k, v in forced.get(row["story"], {}).items() if k != "story"}} for row in rows]


def rows_markdown(rows: Sequence[dict], digits: int = 3) -> str:
    """A markdown table of rows (the columns of the first row); NaN and None show as n/a."""
    if not rows:
        return "_(no rows)_"

    def cell(value) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
        return "n/a" if value is None else str(value)

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_units(rows: Sequence[dict]):
    """A strip per metric of `unit_rows` (those with a value): each dot one unit, coloured by seed, the bar at the
    cell's mean. The spread of the dots is what the report's intervals resample."""
    columns = [m for m in (rows[0] if rows else {}) if m not in ("seed", "story")]
    metrics = [m for m in columns if any(math.isfinite(_number(row.get(m))) for row in rows)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 0.5, 3.0), squeeze=False)
    seeds = sorted({row["seed"] for row in rows})
    jitter = np.linspace(-0.15, 0.15, len(rows)) if len(rows) > 1 else np.zeros(len(rows))
    for axis, metric in zip(axes[0], metrics):
        values = np.array([_number(row.get(metric)) for row in rows])
        axis.scatter(jitter, values, c=[f"C{seeds.index(row['seed'])}" for row in rows], s=18)
        if np.isfinite(values).any():
            axis.hlines(np.nanmean(values), -0.3, 0.3, color="black", lw=1.5)
        axis.set_xlim(-0.5, 0.5)
        axis.set_xticks([])
        axis.set_title("\n".join(textwrap.wrap(metric_label(metric), 22)), fontsize=8)
    figure.suptitle(f"{len(rows)} unit(s), one colour per seed {seeds}; bar: the cell's mean", fontsize=9)
    figure.tight_layout()
    return figure


def absolute_noise(variance: dict | None) -> dict[str, float]:
    """The retraining variance's largest changes that are absolute (the FID-analogue's is relative: left out)."""
    changes = (variance or {}).get("largest_change") or {}
    return {metric: change for metric, change in changes.items() if metric != "fid"}


def _claim_label(number: int, claim: str, width: int) -> str:
    """A finding's number and claim on at most two lines."""
    return "\n".join(textwrap.wrap(textwrap.shorten(f"{number}. {claim}", 2 * width - 4), width))


def plot_findings(findings: Sequence[dict], noise: dict[str, float] | None = None, width: int = 58):
    """Forest plot: one row per finding (numbered as listed), its paired difference (dot) and 95% interval (bar),
    coloured by verdict; one panel per metric, each with its own scale and a line at 0. Positive is the claim's
    direction. A hollow dot has no interval. `noise` (metric -> change) shades what retraining alone moved."""
    metrics = list(dict.fromkeys(f["metric"] for f in findings))
    rows = {m: [(i, f) for i, f in enumerate(findings, start=1) if f["metric"] == m] for m in metrics}
    heights = [len(rows[m]) + 1.2 for m in metrics]
    figure, axes = plt.subplots(
        len(metrics), 1, figsize=(11, 0.5 * sum(heights) + 0.6), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for axis, metric in zip(axes[:, 0], metrics):
        for y, (number, finding) in enumerate(reversed(rows[metric])):
            colour = VERDICT_COLOURS[finding["verdict"]]
            low, high = finding.get("ci95") or (None, None)
            if low is not None:
                axis.hlines(y, low, high, color=colour, lw=2.5)
            hollow = low is None
            axis.plot(finding["difference"], y, "o", color=colour, mfc="white" if hollow else colour, ms=6)
        axis.axvline(0, color="black", lw=0.8)
        if noise and metric in noise:
            axis.axvspan(-noise[metric], noise[metric], color="grey", alpha=0.15, lw=0)
        labels = [_claim_label(n, f["claim"], width) for n, f in reversed(rows[metric])]
        axis.set_yticks(range(len(labels)), labels, fontsize=7.5)
        axis.set_ylim(-0.7, len(labels) - 0.3)
        axis.set_title(f"{metric_label(metric)} (> 0: as the claim says)", fontsize=9, loc="left")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2.5, label=v) for v, c in VERDICT_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", marker="o", mfc="white", lw=0, label="no interval"))
    if noise:
        handles.append(Patch(color="grey", alpha=0.15, label="moved by retraining alone"))
    figure.legend(handles=handles, fontsize=8, loc="upper center", ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))
    return figure
