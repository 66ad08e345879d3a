"""The ablation browser: a finished report's rows side by side, no model needed (issue 14).

It reads what `labkit report` wrote: `summary.json` (every row's value and 95% bootstrap interval, as in
`index.md`) and each cell's `runs/<run>/metrics.json` (per-segment curves) and `strip.png` (its story strip:
segments 1, 10, 25 and the last, two stories). Pick a table, a metric and rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from labkit.core.paths import project_root
from labkit.widgets.common import PlotArea, error_html

TABLES = {"table2": "Table 2: attention policies", "table4": "Table 4: de-tokenizer adaptation", "stress": "stress"}
MATCHED = " (matched budget)"
# where a metric's per-segment curve lives in a cell's metrics.json (teacher-forced NLL for every caption metric)
CURVES = {
    "char_acc": ("per_segment", "char_acc"),
    "clip": ("per_segment", "clip"),
    "style_consistency": ("per_segment", "style_consistency"),
    "caption_nll": ("teacher_forced", "nll"),
    "caption_nll_within": ("teacher_forced", "nll"),
    "caption_nll_beyond": ("teacher_forced", "nll"),
    "feature_cosine_error": ("teacher_forced", "cosine_error"),
}
FALLBACK_CURVE = "char_acc"  # the FID-analogue has no per-segment value: show the character accuracy instead


def load_report(folder: Path | str) -> tuple[dict, list[dict]]:
    """(summary.json, every cell record with its folder under "folder") of a report; FileNotFoundError naming
    the file when the folder holds no finished report."""
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no report here; run `make report` (or `labkit report`) first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for metrics in sorted((folder / "runs").glob("*/metrics.json")):
        record = json.loads(metrics.read_text(encoding="utf-8"))
        record["folder"] = str(metrics.parent)
        records.append(record)
    return summary, records


def table_rows(summary: dict, table: str) -> dict[str, dict]:
    if table not in TABLES:
        raise ValueError(f"table: choose one of {', '.join(TABLES)} (got {table!r})")
    rows = summary.get(table) or {}
    return rows.get("rows", rows) if table != "stress" else rows


def row_record(summary: dict, records: list[dict], table: str, row: str) -> dict | None:
    """The cell behind a row: the one whose images the row's metrics come from."""
    if table == "table2":
        want = {"policy": row.removesuffix(MATCHED), "segments": 25, "adaptation": summary["table2"].get("adaptation")}
        budget = "matched" if row.endswith(MATCHED) else "training"
    elif table == "table4":
        want, budget = {"policy": summary["table4"].get("policy", "mm-sink"), "segments": 25, "adaptation": row}, None
    else:
        want, budget = {"policy": row, "segments": 100}, None
    for record in records:
        parameters = record["parameters"]
        if all(parameters.get(k) == v for k, v in want.items()):
            if budget is None or (parameters.get("budget") or "training") == budget:
                return record
    return None


def metrics_of(summary: dict, table: str) -> list[str]:
    """The metrics with intervals in `table`, in the report's order."""
    names: list[str] = []
    for row in table_rows(summary, table).values():
        names += [m for m in (row.get("ci95") or {}) if m not in names]
    return names


def curve(record: dict, metric: str) -> tuple[str, list] | None:
    name = metric if metric in CURVES else FALLBACK_CURVE
    part, key = CURVES[name]
    values = ((record.get("metrics") or {}).get(part) or {}).get(key)
    return (name, values) if values else None


def plot_rows(summary: dict, records: list[dict], table: str, metric: str, rows: list[str]):
    """Left: each row's value and 95% interval. Right: the rows' per-segment curves of the metric."""
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: pick at least one row")
    data = table_rows(summary, table)
    figure, (forest, curves) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 3))
    for y, row in enumerate(rows):
        value, (low, high) = data[row].get(metric), (data[row].get("ci95") or {}).get(metric) or (None, None)
        if value is None:
            continue
        forest.plot([value], [y], "o", color=f"C{y}")
        if low is not None and high is not None:
            forest.plot([low, high], [y, y], color=f"C{y}")
    forest.set(yticks=range(len(rows)), yticklabels=rows, xlabel=metric, title=f"{TABLES[table]}: {metric}, 95% CI")
    forest.invert_yaxis()
    shown = None
    for y, row in enumerate(rows):
        record = row_record(summary, records, table, row)
        found = curve(record, metric) if record else None
        if found:
            shown, values = found
            curves.plot(range(1, len(values) + 1), values, color=f"C{y}", label=row)
    curves.set(xlabel="segment", ylabel=shown or metric, title=f"per segment: {shown or 'no curve in these cells'}")
    if shown:
        curves.legend(fontsize=8)
    figure.tight_layout()
    return figure


def ablation_browser(report: Path | str | None = None, preset: str = "tiny"):
    """Table, metric and row pickers over the report in `report` (default: the committed `reports/<preset>`)."""
    import ipywidgets as widgets

    folder = Path(report) if report else project_root() / "reports" / preset
    area = PlotArea()
    strips = widgets.HBox()
    try:
        summary, records = load_report(folder)
    except FileNotFoundError as error:
        area.message.value = error_html(str(error))
        explorer = widgets.VBox([area.box])
        explorer.area = area
        return explorer
    table = widgets.Dropdown(options=[(v, k) for k, v in TABLES.items() if table_rows(summary, k)], description="table")
    metric = widgets.Dropdown(description="metric")
    rows = widgets.SelectMultiple(description="rows", rows=6, layout={"width": "420px"})

    refilling = [False]  # while a new table fills the pickers, their changes must not draw a half-set state

    def refill(change=None) -> None:
        refilling[0] = True
        try:
            metric.options = metrics_of(summary, table.value)
            rows.options = list(table_rows(summary, table.value))
            rows.value = tuple(rows.options[:3])
        finally:
            refilling[0] = False
        if change is not None:
            area.render(draw)

    def draw():
        shown = []
        for row in rows.value:
            record = row_record(summary, records, table.value, row)
            strip = Path(record["folder"]) / "strip.png" if record else None
            if strip is not None and strip.is_file():
                image = widgets.Image(value=strip.read_bytes(), format="png", layout={"width": "300px"})
                shown.append(widgets.VBox([widgets.Label(row), image]))
        strips.children = shown
        return plot_rows(summary, records, table.value, metric.value, list(rows.value))

    table.observe(refill, names="value")
    refill()
    for control in (metric, rows):
        control.observe(lambda change: None if refilling[0] else area.render(draw), names="value")
    area.render(draw)
    explorer = widgets.VBox([widgets.HBox([table, metric]), rows, area.box, strips])
    explorer.area = area  # the plot area, for tests and notebooks that read what is shown
    return explorer
