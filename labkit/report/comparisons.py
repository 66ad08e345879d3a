"""Paired comparisons between two rows of a report table: a signed difference, its 95% interval and a verdict.

A row is a `paper_tables.Group` of cells (a policy at 25 segments, a de-tokenizer, a stress run). Two rows that
ran the same seeds and stories are compared unit by unit: the `difference` is a paired difference and its `ci95`
a percentile bootstrap over the paired units (`labkit.metrics.intervals`, seed `BOOTSTRAP_SEED`, so the report is
deterministic); the FID-analogue's interval resamples the paired units and recomputes both Fréchet distances.

**Verdicts.** Every verdict is a rule applied to an interval, never typed in: `reproduced` only if the 95% interval
of the difference lies wholly on the paper's side of 0, `contradicted` if wholly on the other side, else
`inconclusive` (`intervals.verdict`). Differences are signed so that positive means "as the claim says". Old
records (no units) give `inconclusive` with "no per-story evidence"; CLIP-analogue comparisons are
`inconclusive` while the image-text judge is below its trust bar (`CLIP_TRUST_BAR`, notebook 02). An entry's
`why` says what explains a verdict other than `reproduced`.

Public: `Comparisons(groups, rows, judges)(better, worse, metric)` and `all_of(entries)`.
"""

from __future__ import annotations

import math

import numpy as np

from labkit.metrics.intervals import bootstrap_ci, paired_bootstrap, verdict
from labkit.report.paper_tables import (
    BOOTSTRAP_SEED,
    FID_RESAMPLES,
    RESAMPLES,
    STORY_METRICS,
    Group,
    as_interval,
    as_number,
)

CLIP_TRUST_BAR = 0.95  # notebook 02: below this held-out top-1, the image-text judge cannot rank policies
LOWER_IS_BETTER = {"fid", *STORY_METRICS}
LABELS = {
    "fid": "FID-analogue",
    "clip": "CLIP-analogue",
    "char_acc": "character accuracy",
    "style_consistency": "style consistency",
    "caption_nll": "teacher-forced caption NLL",
    "caption_nll_within": "teacher-forced caption NLL within the training length",
    "caption_nll_beyond": "teacher-forced caption NLL beyond the training length",
    "feature_cosine_error": "teacher-forced feature cosine error",
}


def _entry_why(entry: dict) -> str | None:
    if entry["verdict"] == "reproduced":
        return None
    if entry["ci95"][0] is None:
        return None  # the reason is set where the interval went missing
    if entry["verdict"] == "contradicted":
        return f"the 95% interval over {entry['n']} paired units lies on the other side of 0"
    return f"the 95% interval over {entry['n']} paired units includes 0"


def _clip_gate(judges: dict | None) -> str | None:
    """Why a CLIP-analogue comparison cannot be trusted (None when the judge clears its bar)."""
    top1 = (judges or {}).get("test_clip_top1")
    if top1 is None:
        return "the image-text judge's accuracy is unknown (no judges manifest)"
    if top1 < CLIP_TRUST_BAR:
        return f"the image-text judge is below its trust bar (top-1 {top1:.1%} < {CLIP_TRUST_BAR:.0%})"
    return None


class Comparisons:
    """Paired comparisons between named groups, each computed once per `findings` call."""

    def __init__(self, groups: dict[str, Group], rows: dict[str, dict], judges: dict | None):
        self.groups, self.rows, self.judges, self.done = groups, rows, judges, {}

    def __call__(self, better: str, worse: str, metric: str) -> dict:
        """The claim "`better` beats `worse` on `metric`": difference > 0 favours `better`."""
        key = (better, worse, metric)
        if key not in self.done:
            self.done[key] = self._compute(better, worse, metric)
        return dict(self.done[key])

    def _definition(self, better: str, worse: str, metric: str) -> str:
        first, second = (worse, better) if metric in LOWER_IS_BETTER else (better, worse)
        return f"{first} − {second} {LABELS[metric]}; > 0 favours {better}"

    def _row_difference(self, better: str, worse: str, metric: str) -> float | None:
        a, b = (self.rows.get(better) or {}).get(metric), (self.rows.get(worse) or {}).get(metric)
        if a is None or b is None:
            return None
        return b - a if metric in LOWER_IS_BETTER else a - b

    def _compute(self, better: str, worse: str, metric: str) -> dict:
        entry = {
            "comparison": f"{better} vs {worse}",
            "metric": metric,
            "definition": self._definition(better, worse, metric),
        }
        ga, gb = self.groups.get(better), self.groups.get(worse)
        difference, low, high, n, why = self._row_difference(better, worse, metric), None, None, None, None
        if metric in STORY_METRICS:
            if ga is None or gb is None or not ga.story_keys or not gb.story_keys:
                why = "no per-story evidence (teacher-forced scores per story are missing)"
            else:
                pairs = [(ga.story_keys.index(s), gb.story_keys.index(s)) for s in ga.story_keys if s in gb.story_keys]
                a, b = ga.story_values[metric], gb.story_values[metric]
                diffs = [b[j] - a[i] for i, j in pairs if a[i] is not None and b[j] is not None]
                difference, low, high = bootstrap_ci(diffs, RESAMPLES, BOOTSTRAP_SEED)
                n = len(diffs)
                why = None if n >= 2 else f"{n} paired stories: no interval"
        elif ga is None or gb is None or not ga.per_unit or not gb.per_unit:
            why = "no per-story evidence (these cells list no units)"
        else:
            index_b = {k: j for j, k in enumerate(gb.unit_keys)}
            pairs = [(i, index_b[k]) for i, k in enumerate(ga.unit_keys) if k in index_b]
            n = len(pairs)
            if n == 0:
                why = "the two cells share no (seed, story) units to pair"
            elif metric == "fid":
                fa, fb = ga.frechet(), gb.frechet()
                if fa is None or fb is None:
                    why = "no FID features for these cells: no interval"
                else:
                    ia, ib = np.array([i for i, _ in pairs]), np.array([j for _, j in pairs])
                    difference, low, high = paired_bootstrap(
                        lambda idx: fb(ib[idx]) - fa(ia[idx]), n, FID_RESAMPLES, BOOTSTRAP_SEED, bias_corrected=True
                    )
            else:
                a, b = ga.unit_values[metric], gb.unit_values[metric]
                diffs = [a[i] - b[j] for i, j in pairs if a[i] is not None and b[j] is not None]
                difference, low, high = bootstrap_ci(diffs, RESAMPLES, BOOTSTRAP_SEED)
                n = len(diffs)
            if why is None and n < 2:
                why = f"{n} paired unit(s): no interval"
        if n is None:  # old records: the number of seeds behind the two rows
            n = min((self.rows.get(name) or {}).get("seeds") or 0 for name in (better, worse))
        entry.update(difference=as_number(difference), ci95=as_interval(low, high), n=n)
        entry["verdict"] = verdict(entry["ci95"][0], entry["ci95"][1], +1)
        gate = _clip_gate(self.judges) if metric == "clip" else None
        if gate:  # the interval is reported anyway; the verdict waits for a judge that can be trusted
            entry["verdict"], why = "inconclusive", "; ".join(t for t in (gate, why) if t)
        entry["why"] = why or _entry_why(entry)
        return entry


def all_of(entries: list[dict]) -> list[dict]:
    """Entries of a conjunctive claim ("better than each of"), the deciding one first: a contradicted one if any
    (the most clearly contradicted), else the weakest (lowest lower bound; an undefined bound is weakest)."""
    contradicted = [e for e in entries if e["verdict"] == "contradicted"]
    if contradicted:
        first = min(contradicted, key=lambda e: e["ci95"][1])
    else:
        unsure = [e for e in entries if e["verdict"] != "reproduced"] or entries
        first = min(unsure, key=lambda e: -math.inf if e["ci95"][0] is None else e["ci95"][0])
    return [first] + [e for e in entries if e is not first]
