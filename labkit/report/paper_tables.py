"""The paper's Table 2 and Table 4 beside the lab's numbers, and the 100-segment stress runs (issue 6).

Everything here is computed from the grid's cell records (`story_ablation.run_cell` writes them); the paper's
values are quoted from the paper (Table 2; Table 4 in App. B). The findings these tables support, each with a
verdict, are `labkit.report.findings`; the paired comparisons behind them are `labkit.report.comparisons`.

**Units and intervals.** A cell record lists its *units* (`metrics.units`: one entry per (seed, story) it
continued) and its teacher-forced scores per story (`metrics.teacher_forced.per_story`). A table row is a `Group`
of cells; each value's `ci95` is a percentile bootstrap over the row's units (`labkit.metrics.intervals`, seed
`BOOTSTRAP_SEED`, so the report is deterministic). The FID-analogue is a set metric: its interval resamples units
and recomputes the Fréchet distance of the resampled generated features (`record["files"]["fid_features"]`,
opened by the caller's `load_features`) against the real ones; without features it has no interval.

Public functions: `table2(records, load_features=None)`, `table4(records, stage3_manifests=None,
load_features=None)` and `stress(records, load_features=None)`; `table2_groups`, `table4_groups` and
`stress_groups` give the rows' `Group`s to the comparisons. `load_features(record) -> {"generated": [units, S-1,
C], "real": [M, C]} | None`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import mean
from typing import Callable

import numpy as np

from labkit.metrics.intervals import bootstrap_ci, paired_bootstrap

# Paper Table 2 (length not stated; time and memory averaged over 50 sequences on one A800).
PAPER_TABLE2 = {
    "dense": {"fid": 119.72, "clip": 0.705, "seconds": 569.67, "memory_gb": 37.99},
    "window": {"fid": 334.90, "clip": 0.598, "seconds": 450.64, "memory_gb": 30.81},
    "sink": {"fid": 221.53, "clip": 0.676, "seconds": 451.94, "memory_gb": 30.81},
    "mm-sink": {"fid": 79.67, "clip": 0.728, "seconds": 473.98, "memory_gb": 31.82},
}
PAPER_TABLE4 = {"fid_before": 153.93, "fid_after": 99.79}  # App. B: de-tokenizer before / after stage 3
# the last two are the lab's controls that split mm-sink-as-coded's gap into its two causes (stale RoPE positions;
# the window eaten by the official slicing): `labkit/caches/image_sinks.py`
TABLE2_POLICIES = (
    "dense",
    "window",
    "sink",
    "mm-sink",
    "mm-sink-as-coded",
    "recompute-window",
    "mm-sink-stale",
    "mm-sink-as-coded-rerotated",
)
TABLE2_SEGMENTS = 25
STRESS_SEGMENTS = 100
# The paper's Table 2 uses its adapted de-tokenizer (it says: fully fine-tuned); the lab takes the first present.
TABLE2_ADAPTATIONS = ("full", "official", "off")
TABLE4_POLICY = "mm-sink"
MATCHED = " (matched budget)"  # suffix of Table 2 rows drawn from cells with budget "matched"

BOOTSTRAP_SEED = 0  # every interval of the report uses this seed: two reports of the same cells agree exactly
RESAMPLES = 2000
FID_RESAMPLES = 1000  # a resampled Fréchet distance costs one C x C eigendecomposition: half as many draws

FeatureLoader = Callable[[dict], "dict | None"]

UNIT_METRICS = ("clip", "char_acc", "style_consistency")  # per (seed, story) unit; higher is better
STORY_METRICS = ("caption_nll", "caption_nll_within", "caption_nll_beyond", "feature_cosine_error")  # lower better
TABLE2_METRICS = ("fid", *UNIT_METRICS, *STORY_METRICS)
TABLE4_METRICS = ("fid", "char_acc", "style_consistency", "clip")


# ---- numbers --------------------------------------------------------------------------------------------------


def as_number(value) -> float | None:
    """A float for JSON: None for None and NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def as_interval(low, high) -> list:
    return [as_number(low), as_number(high)]


def _mean_or_none(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return mean(kept) if kept and len(kept) == len(values) else None


def _path(record: dict, *keys):
    value = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


class _Frechet:
    """The Fréchet distance of a resampled set of units' generated features against fixed real features.

    Equal to `labkit.metrics.scores.frechet_distance(generated[idx].flatten(0, 1), real)` (tested), computed from
    per-unit sums and Gram matrices so that a bootstrap resample costs one C x C eigendecomposition:
    tr((S_a S_b)^1/2) = sum of the square roots of the eigenvalues of S_b^1/2 S_a S_b^1/2."""

    def __init__(self, generated, real):
        generated = np.asarray(generated, dtype=np.float64)
        real = np.asarray(real, dtype=np.float64)
        self.units, self.rows = generated.shape[:2]
        self.real_mean = real.mean(axis=0)
        centred = real - self.real_mean
        covariance = centred.T @ centred / (len(real) - 1)
        self.real_trace = float(np.trace(covariance))
        values, vectors = np.linalg.eigh(covariance)
        root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S_b^1/2
        self.sums = generated.sum(axis=1)  # [U, C]
        self.squares = np.einsum("urc,urc->u", generated, generated)  # per-unit sums of squares: tr(S_a)
        whitened = generated @ root  # the generated rows seen through S_b^1/2
        self.root_sums = whitened.sum(axis=1)
        self.root_grams = np.einsum("urc,urd->ucd", whitened, whitened)  # [U, C, C]
        self._memo: dict[bytes, float] = {}

    def __call__(self, indices) -> float:
        counts = np.bincount(np.asarray(indices), minlength=self.units).astype(np.float64)
        # The report bootstraps every comparison with the same seed, so a row's statistic meets the same resamples
        # again and again (its interval, then each paired difference it is part of): compute each multiset once.
        key = counts.tobytes()
        if key not in self._memo:
            self._memo[key] = self._distance(counts)
        return self._memo[key]

    def _distance(self, counts: np.ndarray) -> float:
        total = counts.sum() * self.rows
        if total < 2:
            return math.nan
        average, root_average = counts @ self.sums / total, counts @ self.root_sums / total
        trace = (counts @ self.squares - total * (average**2).sum()) / (total - 1)
        product = (np.tensordot(counts, self.root_grams, axes=1) - total * np.outer(root_average, root_average)) / (
            total - 1
        )  # S_b^1/2 S_a S_b^1/2
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0, None)).sum()
        return float(((average - self.real_mean) ** 2).sum() + trace + self.real_trace - 2 * cross)


def _seed_range(parameters: dict) -> list[int]:
    seed, count = parameters.get("seed", 0), parameters.get("seeds", 1) or 1
    return list(range(seed, seed + count)) if isinstance(seed, int) else [seed]


# ---- groups of cells ------------------------------------------------------------------------------------------


@dataclass
class Group:
    """The cells behind one table row: `cells` draw its images; `scored` (any adaptation) hold its teacher-forced
    scores. Units are keyed (seed, story); stories (teacher-forced) by story."""

    name: str
    cells: list[dict]
    scored: list[dict]
    load_features: FeatureLoader | None = None
    every: list[dict] = field(default_factory=list)  # every cell of the row, whatever draws its images
    _frechet: object = field(default=None, repr=False)
    _loaded: bool = field(default=False, repr=False)

    def __post_init__(self):
        self.per_unit = bool(self.cells) and all(_path(c, "metrics", "units") for c in self.cells)
        self.unit_keys, self.unit_values, self._unit_source = [], {m: [] for m in UNIT_METRICS}, []
        seen = set()
        if self.per_unit:
            for cell_index, cell in enumerate(self.cells):
                units = cell["metrics"]["units"]
                count = max((len(v) for v in units.values() if isinstance(v, list)), default=0)
                seeds = units.get("seed") or [cell["parameters"].get("seed", 0)] * count
                stories = units.get("story") or list(range(count))
                for row in range(count):
                    key = (seeds[row], stories[row])
                    if key in seen:  # the same unit drawn twice (a duplicated cell): keep the first
                        continue
                    seen.add(key)
                    self.unit_keys.append(key)
                    self._unit_source.append((cell_index, row))
                    for metric in UNIT_METRICS:
                        values = units.get(metric) or []
                        self.unit_values[metric].append(values[row] if row < len(values) else None)
        self.story_keys, self.story_values = [], {m: [] for m in STORY_METRICS}
        for cell in self.scored:
            per_story = _path(cell, "metrics", "teacher_forced", "per_story")
            if not per_story or not per_story.get("story"):
                continue
            for row, story in enumerate(per_story["story"]):
                if story in self.story_keys:  # teacher forcing is deterministic: any cell's copy will do
                    continue
                self.story_keys.append(story)
                for metric in STORY_METRICS:
                    values = per_story.get(metric) or []
                    self.story_values[metric].append(values[row] if row < len(values) else None)

    @property
    def seeds(self) -> int:
        if self.per_unit:
            return len({seed for seed, _ in self.unit_keys})
        return len({s for c in self.cells for s in _seed_range(c["parameters"])})

    def frechet(self) -> _Frechet | None:
        """The FID-analogue statistic over this group's units, or None without features."""
        if not self._loaded:
            self._loaded = True
            if self.per_unit and self.load_features is not None and self.unit_keys:
                loaded = [self.load_features(cell) for cell in self.cells]
                if all(f is not None for f in loaded):
                    generated = [np.asarray(loaded[c]["generated"][r], dtype=np.float64) for c, r in self._unit_source]
                    self._frechet = _Frechet(np.stack(generated), np.asarray(loaded[0]["real"], dtype=np.float64))
        return self._frechet

    def value(self, metric: str) -> tuple[float | None, list]:
        """(point, [low, high]) of a metric over this group's units (stories for teacher-forced metrics)."""
        if metric == "fid":
            statistic = self.frechet()
            if statistic is None:
                return _mean_or_none([_path(c, "metrics", "overall", "fid") for c in self.cells]), [None, None]
            point, low, high = paired_bootstrap(
                statistic, len(self.unit_keys), FID_RESAMPLES, BOOTSTRAP_SEED, bias_corrected=True
            )
            return as_number(point), as_interval(low, high)
        if metric in UNIT_METRICS:
            if not self.per_unit:
                return _mean_or_none([_path(c, "metrics", "overall", metric) for c in self.cells]), [None, None]
            point, low, high = bootstrap_ci(self.unit_values[metric], RESAMPLES, BOOTSTRAP_SEED)
            return as_number(point), as_interval(low, high)
        if not self.story_keys:  # old records: only the cell-level average exists (feature error), no interval
            old = {"feature_cosine_error": ("metrics", "teacher_forced", "feature_cosine_error")}.get(metric)
            scored = [c for c in self.scored if _path(c, "metrics", "teacher_forced")]
            return (_mean_or_none([_path(c, *old) for c in scored]) if old and scored else None), [None, None]
        point, low, high = bootstrap_ci(self.story_values[metric], RESAMPLES, BOOTSTRAP_SEED)
        return as_number(point), as_interval(low, high)


def _budget(record: dict) -> str:
    return record["parameters"].get("budget") or "training"


def _cells(records: list[dict], budget: str | None = None, **where) -> list[dict]:
    return [
        r
        for r in records
        if all(r["parameters"].get(k) == v for k, v in where.items()) and (budget is None or _budget(r) == budget)
    ]


def _table2_adaptation(records: list[dict]) -> str | None:
    present = [a for a in TABLE2_ADAPTATIONS if _cells(records, segments=TABLE2_SEGMENTS, adaptation=a)]
    return present[0] if present else None


def table2_groups(records: list[dict], adaptation, load_features: FeatureLoader | None) -> dict[str, Group]:
    """Table 2's rows: one per policy with budget "training", then "<policy> (matched budget)" ones."""
    groups = {}
    matched = sorted({r["parameters"]["policy"] for r in _cells(records, "matched", segments=TABLE2_SEGMENTS)})
    for budget, policies in (("training", TABLE2_POLICIES), ("matched", matched)):
        for policy in policies:
            every = _cells(records, budget, policy=policy, segments=TABLE2_SEGMENTS)
            if not every:
                continue
            name = policy if budget == "training" else policy + MATCHED
            cells = [c for c in every if c["parameters"].get("adaptation") == adaptation]
            scored = [c for c in every if _path(c, "metrics", "teacher_forced")]
            groups[name] = Group(name, cells, scored, load_features, every)
    return groups


def _kv_entries(record: dict) -> float | None:
    timings = record.get("timings") or {}
    if timings.get("kv_entries_last_segment") is not None:
        return timings["kv_entries_last_segment"]
    entries = timings.get("kv_entries")
    return entries[-1] if entries else None


# ---- tables ---------------------------------------------------------------------------------------------------


def table2(records: list[dict], load_features: FeatureLoader | None = None) -> dict:
    """Per policy at 25 segments: image metrics (adapted de-tokenizer), speed, KV size, teacher-forced text.

    Rows are keyed by policy for budget "training" (a missing budget means "training") and "<policy> (matched
    budget)" for budget "matched" cells. Each row has `seeds` (distinct seeds among its units), `n` (its units;
    the number of seeds for old records without units), `n_stories` (teacher-forced stories), every metric's value
    and `ci95[metric]` = [low, high] (bootstrap over units; null without per-unit evidence, and for the
    FID-analogue without `load_features`). Time and memory come from the same cells as the images (a policy's
    generation is the same whatever draws it)."""
    adaptation = _table2_adaptation(records)
    rows = {}
    for name, group in table2_groups(records, adaptation, load_features).items():
        every = group.cells or group.every  # generation (time, memory) is the same for every adaptation
        values, intervals = {}, {}
        for metric in TABLE2_METRICS:
            values[metric], intervals[metric] = group.value(metric)
        rows[name] = {
            "policy": name.removesuffix(MATCHED),
            "budget": "training" if name in TABLE2_POLICIES else "matched",
            "seeds": group.seeds,
            "n": len(group.unit_keys) if group.per_unit else group.seeds,
            "n_stories": len(group.story_keys),
            **values,
            "lpips": _mean_or_none([_path(c, "metrics", "overall", "lpips") for c in group.cells]),
            "ci95": intervals,
            "seconds_per_segment": _mean_or_none([_path(c, "timings", "seconds_per_segment") for c in every]),
            "seconds_per_token": _mean_or_none([_path(c, "timings", "seconds_per_token") for c in every]),
            "timing_runs": {
                key: [v for v in (_path(c, "timings", key) for c in every) if v is not None]
                for key in ("seconds_per_segment", "seconds_per_token")
            },
            "kv_bytes": _mean_or_none([_path(c, "timings", "kv_bytes_last_segment") for c in every]),
            "kv_entries": _mean_or_none([_kv_entries(c) for c in every]),
            "window": _mean_or_none([c["parameters"].get("window") for c in every]),
            "perplexity": _mean_or_none([_path(c, "metrics", "teacher_forced", "perplexity") for c in group.scored]),
            "paper": PAPER_TABLE2.get(name),
        }
    return {"segments": TABLE2_SEGMENTS, "adaptation": adaptation, "rows": rows}


def table4_groups(records: list[dict], load_features: FeatureLoader | None) -> dict[str, Group]:
    groups = {}
    for adaptation in ("off", "official", "full"):
        cells = _cells(records, "training", policy=TABLE4_POLICY, segments=TABLE2_SEGMENTS, adaptation=adaptation)
        if cells:
            groups[adaptation] = Group(f"{TABLE4_POLICY} ({adaptation})", cells, [], load_features)
    return groups


def table4(
    records: list[dict], stage3_manifests: dict[str, dict] | None = None, load_features: FeatureLoader | None = None
) -> dict:
    """FID-analogue and accuracies of mm-sink stories drawn before (off) and after adaptation (each mode), each
    with `ci95`, `n` and `seeds` as in `table2`, plus stage 3's own scores on regressed test pairs when its
    manifests are given."""
    rows = {}
    for adaptation, group in table4_groups(records, load_features).items():
        values, intervals = {}, {}
        for metric in TABLE4_METRICS:
            values[metric], intervals[metric] = group.value(metric)
        rows[adaptation] = {
            **values,
            "ci95": intervals,
            "seeds": group.seeds,
            "n": len(group.unit_keys) if group.per_unit else group.seeds,
        }
    pairs = {}
    for mode, manifest in (stage3_manifests or {}).items():
        test, before = manifest["metrics"]["test"], manifest["metrics"]["stage1_on_regressed"]
        pairs[mode] = {
            "before": {
                "fid": before["fid_analogue"],
                "char_acc": before["character_accuracy"],
                "style": before["style_accuracy"],
            },
            "after": {
                "fid": test["fid_analogue"],
                "char_acc": test["character_accuracy"],
                "style": test["style_accuracy"],
            },
            "paired": manifest["metrics"].get("paired"),  # per-pair gains with intervals (stage 3 since issue 13)
        }
    return {
        "policy": TABLE4_POLICY,
        "segments": TABLE2_SEGMENTS,
        "rows": rows,
        "regressed_test_pairs": pairs,
        "paper": PAPER_TABLE4,
    }


def stress_groups(records: list[dict], load_features: FeatureLoader | None) -> dict[str, Group]:
    groups = {}
    for cell in _cells(records, "training", segments=STRESS_SEGMENTS, adaptation="off"):
        policy = cell["parameters"]["policy"]
        groups.setdefault(policy, []).append(cell)
    return {
        p: Group(p, cells, [c for c in cells if _path(c, "metrics", "teacher_forced")], load_features)
        for p, cells in groups.items()
    }


def stress(records: list[dict], load_features: FeatureLoader | None = None) -> dict:
    """100-segment runs per policy: time at segment 100 over segment 10 (target <= 1.15 for sink policies), KV
    growth, and the image metrics with `ci95`, `n` and `seeds` as in `table2`."""
    out = {}
    for policy, group in stress_groups(records, load_features).items():
        ratios, kv10, kv100, entries10, entries100 = [], [], [], [], []
        for cell in group.cells:
            seconds, kv = cell["timings"]["seconds"], cell["timings"]["kv_bytes"]
            ratios.append(mean(seconds[95:100]) / mean(seconds[8:13]))  # five segments around 100 and around 10
            kv10.append(kv[9])
            kv100.append(kv[99])
            entries = cell["timings"].get("kv_entries")
            if entries:
                entries10.append(entries[9])
                entries100.append(entries[99])
        values, intervals = {}, {}
        for metric in ("fid", "char_acc", "clip", "caption_nll_beyond"):
            values[metric], intervals[metric] = group.value(metric)
        out[policy] = {
            "seconds_ratio_100_vs_10": mean(ratios),
            "kv_bytes_10": mean(kv10),
            "kv_bytes_100": mean(kv100),
            "kv_entries_10": mean(entries10) if entries10 else None,
            "kv_entries_100": mean(entries100) if entries100 else None,
            **values,
            "ci95": intervals,
            "seeds": group.seeds,
            "n": len(group.unit_keys) if group.per_unit else group.seeds,
        }
    return out
