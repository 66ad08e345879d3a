"""Each claim of the paper (and the lab's own checks) with the evidence the report's cells give it (issue 6).

`findings(t2, t4, records, judges, load_features)` turns `paper_tables.table2` / `table4` / `stress` and the cell
records behind them into findings: the claim, the paper's numbers, the lab's, and a verdict decided by the paired
comparison of the claim's primary metric (`labkit.report.comparisons`), the other comparisons kept as evidence. A
timing ratio is `inconclusive` unless repeated timings exist and their whole range excludes 1; the KV size at
segment 25 is deterministic and needs no interval. A finding's `why` says what the lab measured that explains a
verdict other than `reproduced` (the texts below), so a negative result is never silent.
"""

from __future__ import annotations

import math

from labkit.metrics.intervals import verdict
from labkit.report.comparisons import LABELS, Comparisons, all_of
from labkit.report.paper_tables import (
    MATCHED,
    PAPER_TABLE2,
    PAPER_TABLE4,
    FeatureLoader,
    as_interval,
    as_number,
    stress,
    stress_groups,
    table2_groups,
    table4_groups,
)

# Why-texts: what the lab measured that explains a verdict other than `reproduced`.
NEUTRAL_POLICIES = (
    "What a policy keeps matters only once it evicts, i.e. for the segments beyond the training length; at 25 "
    "segments that is part of each story, so the policies' differences are small against the story-to-story spread "
    "of the units. Notebook 05 measures how much attention the MLLM puts on its first tokens (the sink that window "
    "attention evicts) and the long-context NLL of each policy."
)
NEUTRAL_WINDOW = (
    "The paper's window collapse follows from evicting the first tokens that a large model uses as an attention "
    "sink; how much the lab's MLLM relies on its first tokens, and so how much evicting them costs, is measured in "
    "notebook 05 (sink emergence)."
)
NEUTRAL_SINK = (
    "Keeping the first 4 tokens helps only as much as the model attends to them; notebook 05 measures that "
    "attention and the sink and window long-context NLL."
)
NEUTRAL_AS_CODED = (
    "The gap between mm-sink and mm-sink as coded mixes two effects: stale RoPE positions of kept keys and a window "
    "eaten by the official code's overwrite/duplicate quirk; the two control findings below take one at a time."
)
NEUTRAL_CONTROL = "Each control changes one thing against mm-sink; what it does not change cannot explain its gap."
NEUTRAL_STAGE3 = (
    "Stage 3 can gain only as much as the regressed features differ from true ones (Table 2's feature cosine "
    "error) and as the stage-1 de-tokenizer's own accuracy from true features allows (notebooks 03 and 06)."
)
NEUTRAL_PERPLEXITY = (
    "A policy that keeps everything (dense) sees the whole story, so it is "
    "expected to score well; a sink policy beats it only if the model loses its way past the training length."
)
NEUTRAL_STRESS = (
    "The stress runs continue few stories per policy (units listed as n), often one, which gives no interval."
)
ONE_TIMING = "one timing per cell: within run-to-run spread unknown"


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: list, digits: int = 3) -> str:
    return "no interval" if ci[0] is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _finding(claim: str, paper: str, lab: str, entries: list[dict], context: str | None) -> dict:
    """A finding whose verdict is its first (primary) entry's; the other entries are its `evidence`."""
    primary = entries[0]
    why = None
    if primary["verdict"] != "reproduced":
        reason = primary["why"] and primary["why"] + "."
        why = " ".join(text for text in (reason, context) if text) or None
    return {
        "claim": claim,
        "paper": paper,
        "lab": lab,
        "metric": primary["metric"],
        "definition": primary["definition"],
        "difference": primary["difference"],
        "ci95": primary["ci95"],
        "n": primary["n"],
        "verdict": primary["verdict"],
        "why": why,
        "evidence": entries[1:],
    }


HELD_OUT_WHY = {"contradicted": "lies on the other side of 0", "inconclusive": "includes 0"}


def _held_out_entry(mode: str, paired: dict, key: str, metric: str) -> dict:
    """An evidence entry from stage 3's manifest: the gain on its held-out regressed pairs, paired pair by pair."""
    gain = paired[key]
    low, high = gain["ci95"]
    decided = verdict(low, high, 1)
    return {
        "comparison": f"{mode} vs stage 1 on stage 3's held-out regressed pairs",
        "metric": metric,
        "definition": "FID-analogue before - after" if metric == "fid" else "identity after - before",
        "difference": gain["difference"],
        "ci95": [low, high],
        "n": paired["n"],
        "verdict": decided,
        "why": None if decided == "reproduced" else f"on the held-out pairs the interval {HELD_OUT_WHY[decided]}",
    }


def _values_text(rows: dict, names: list[str], metric: str) -> str:
    def one(name: str) -> str:
        value = rows[name].get(metric)
        interval = (rows[name].get("ci95") or {}).get(metric) or [None, None]
        return f"{name} {_fmt(value)}" + ("" if value is None else f" {_fmt_ci(interval)}")

    return f"{LABELS[metric]}: " + ", ".join(one(name) for name in names)


def _perplexity_text(row: dict) -> str:
    """exp of a row's mean per-story caption NLL and of its interval's bounds."""
    low, high = row["ci95"]["caption_nll"]
    interval = "(no interval)" if low is None else f"[{math.exp(low):.3f}, {math.exp(high):.3f}]"
    return f"{math.exp(row['caption_nll']):.3f} {interval}"


def _timing_entry(rows: dict, fast: str, slow: str) -> tuple[dict, str]:
    """Relative speed-up slow/fast - 1 (> 0: `fast` is faster): seconds per token if both rows have it, else per
    segment. Repeated timings give the range of ratios over every pair of repeats; one timing per cell gives none."""
    key = (
        "seconds_per_token"
        if rows[fast].get("seconds_per_token") and rows[slow].get("seconds_per_token")
        else ("seconds_per_segment")
    )
    a, b = rows[fast]["timing_runs"][key], rows[slow]["timing_runs"][key]
    point = None if not rows[fast][key] or rows[slow][key] is None else rows[slow][key] / rows[fast][key] - 1
    entry = {
        "comparison": f"{fast} vs {slow}",
        "metric": key,
        "definition": f"{slow} {key.replace('_', ' ')} / {fast} {key.replace('_', ' ')} − 1; > 0 means {fast} is faster"
        " (interval: the range over every pair of repeated timings)",
        "difference": as_number(point),
    }
    if len(a) >= 2 and len(b) >= 2 and min(a) > 0:
        low, high = min(b) / max(a) - 1, max(b) / min(a) - 1
        entry.update(ci95=as_interval(low, high), n=min(len(a), len(b)))
        entry["verdict"] = verdict(low, high, +1)
        entry["why"] = (
            None if entry["verdict"] == "reproduced" else "the range of repeated timings includes a ratio of 1"
        )
    else:
        entry.update(ci95=[None, None], n=min(len(a), len(b)), verdict="inconclusive", why=ONE_TIMING)
    text = f"{key.replace('_', ' ')}: {slow} {_fmt(rows[slow][key], 4)}, {fast} {_fmt(rows[fast][key], 4)}"
    if point is not None:
        text += f" ({point + 1:.2f}x)"
    return entry, text


def findings(
    t2: dict,
    t4: dict,
    records: list[dict] | None = None,
    judges: dict | None = None,
    load_features: FeatureLoader | None = None,
    stress_rows: dict | None = None,
) -> list[dict]:
    """Each paper claim (and the lab's own checks) with an interval and a verdict.

    `t2`, `t4`: `table2` and `table4` of the same `records`; `records`: the cell records (without them no finding
    has per-unit evidence, so all but the deterministic memory finding are inconclusive); `judges`: the judges
    manifest's metrics (`test_clip_top1` gates every CLIP-analogue comparison; unknown judges gate it too);
    `load_features`: opens a record's FID features (None: FID comparisons have no interval); `stress_rows`:
    `stress(records, load_features)` when the caller has it already (it is computed otherwise).

    A finding is a dict: `claim`, `paper`, `lab` (text with numbers), `metric` (the primary metric), `definition`
    (how `difference` is signed: > 0 always means "as the claim says"), `difference`, `ci95` [low, high] (null
    without an interval), `n` (paired units; the number of seeds for old records), `verdict` ("reproduced",
    "contradicted", "inconclusive"), `why` (null when reproduced) and `evidence` (further comparisons, each with
    `comparison`, `metric`, `definition`, `difference`, `ci95`, `n`, `verdict`, `why`). The primary metric decides
    the verdict: caption NLL beyond the training length for Table 2's mechanism claims; the others are evidence."""
    records = records or []
    rows, out = t2["rows"], []
    groups = table2_groups(records, t2["adaptation"], load_features) if records else {}
    compare = Comparisons(groups, rows, judges)
    primary, image = "caption_nll_beyond", ("fid", "clip")

    def paper_pair(a: str, b: str) -> str:
        pa, pb = PAPER_TABLE2.get(a.removesuffix(MATCHED)), PAPER_TABLE2.get(b.removesuffix(MATCHED))
        if not pa or not pb:
            return "not in the paper"
        return f"FID {pa['fid']} vs {pb['fid']}; CLIP {pa['clip']} vs {pb['clip']} (Table 2)"

    def mechanism(better: str, worse: str, claim: str, context: str, paper: str | None = None) -> None:
        if better not in rows or worse not in rows:
            return
        entries = [compare(better, worse, m) for m in (primary, *image)]
        lab = "; ".join(_values_text(rows, [better, worse], m) for m in (primary, *image))
        out.append(_finding(claim, paper or paper_pair(better, worse), lab, entries, context))

    # a) mm-sink against each other mechanism; matched-budget rows when the grid has them
    for other in ("window", "sink", "dense", "window" + MATCHED, "sink" + MATCHED):
        mechanism(
            "mm-sink",
            other,
            f"The multimodal attention sink gives better stories than {other} at 25 segments (Table 2).",
            NEUTRAL_POLICIES,
            None
            if MATCHED not in other
            else "the paper does not state the policies' KV budgets; " + paper_pair("mm-sink", other),
        )
    # b) sink against window
    mechanism(
        "sink", "window", "StreamingLLM's attention sink is better than window attention (Table 2).", NEUTRAL_SINK
    )
    mechanism(
        "sink" + MATCHED,
        "window" + MATCHED,
        "StreamingLLM's attention sink is better than window attention at the same KV budget (Table 2).",
        NEUTRAL_SINK,
    )
    # c) window is the worst: window against each other mechanism, decided by the weakest comparison
    others = [p for p in ("dense", "sink", "mm-sink") if p in rows]
    if "window" in rows and others:
        decisive = all_of([compare(p, "window", primary) for p in others])
        evidence = [compare(p, "window", m) for p in others for m in image]
        out.append(
            _finding(
                "Window attention is the worst mechanism: it collapses once the first tokens are evicted (Table 2).",
                "window FID 334.90, CLIP 0.598: the worst of the four",
                "; ".join(_values_text(rows, ["window", *others], m) for m in (primary, *image)),
                decisive + evidence,
                NEUTRAL_WINDOW,
            )
        )
    # e) memory: deterministic KV size at segment 25
    if "dense" in rows and "mm-sink" in rows:
        metric = "kv_entries" if rows["dense"].get("kv_entries") and rows["mm-sink"].get("kv_entries") else "kv_bytes"
        dense, sink = rows["dense"].get(metric), rows["mm-sink"].get(metric)
        if dense is not None and sink is not None:
            difference = dense - sink
            entry = {
                "comparison": "mm-sink vs dense",
                "metric": metric,
                "definition": f"dense − mm-sink {metric.replace('_', ' ')} at segment 25; > 0 favours mm-sink "
                "(deterministic: the cache size is fixed by the policy and the story, no interval needed)",
                "difference": as_number(difference),
                "ci95": as_interval(difference, difference),
                "n": 1,
                "verdict": verdict(difference, difference, +1),
                "why": None if difference > 0 else "the mm-sink cap is not smaller than 25 tiny segments' cache",
            }
            bytes_text = ""
            if rows["dense"].get("kv_bytes") and rows["mm-sink"].get("kv_bytes"):
                bytes_text = (
                    f"; KV bytes dense {rows['dense']['kv_bytes'] / 1e6:.2f} MB vs mm-sink "
                    f"{rows['mm-sink']['kv_bytes'] / 1e6:.2f} MB"
                )
            out.append(
                _finding(
                    "Dense attention needs the most memory; the multimodal sink keeps it bounded (Table 2 memory "
                    "column).",
                    "37.99 GB dense vs 31.82 GB mm-sink (weights included)",
                    f"KV cache {metric.replace('kv_', '')} at segment 25 (deterministic): dense {dense:.0f} vs mm-sink "
                    f"{sink:.0f} ({dense / sink if sink else math.inf:.2f}x){bytes_text}",
                    [entry],
                    None,
                )
            )
    # f) speed: a ratio of timings, inconclusive without repeats whose range excludes 1
    for fast, slow, claim, paper in (
        (
            "mm-sink",
            "dense",
            "The multimodal sink is faster than dense attention (Table 2 time column).",
            "473.98 s vs 569.67 s",
        ),
        (
            "mm-sink",
            "recompute-window",
            "(Lab comparison, not a paper claim) The sink cache is faster per segment than the released code's "
            "recompute-window, which re-encodes its window once per segment (official issue #36).",
            "not timed in the paper; expected ~1-2x (the released strategy re-encodes once per segment)",
        ),
    ):
        if (
            fast in rows
            and slow in rows
            and rows[fast].get("seconds_per_segment")
            and rows[slow].get("seconds_per_segment")
        ):
            entry, text = _timing_entry(rows, fast, slow)
            out.append(_finding(claim, paper, text, [entry], "Wall-clock times vary between runs and machines."))
    # g) as coded: stale positions and the official quirk, paired over stories
    if "mm-sink" in rows and "mm-sink-as-coded" in rows:
        entries = [compare("mm-sink", "mm-sink-as-coded", m) for m in ("caption_nll", primary)]
        out.append(
            _finding(
                "(Lab finding, official code) The multimodal sink as the released code runs it (keys kept without "
                "re-rotation, the official slicing) writes worse captions than the lab's mm-sink.",
                "the paper's sink is never run by the released code (issue #36)",
                "; ".join(_values_text(rows, ["mm-sink", "mm-sink-as-coded"], m) for m in ("caption_nll", primary)),
                entries,
                NEUTRAL_AS_CODED,
            )
        )
    # g') the two controls, one cause each (same units, teacher-forced captions)
    controls = (
        (
            "mm-sink-stale",
            "(Lab control) Stale RoPE positions alone (mm-sink's entries, keys never re-rotated, as the official code "
            "keeps them) write worse captions than mm-sink.",
        ),
        (
            "mm-sink-as-coded-rerotated",
            "(Lab control) The official slicing alone (its overwritten and duplicated entries, keys re-rotated) "
            "writes worse captions than mm-sink.",
        ),
    )
    for control, claim in controls:
        if "mm-sink" in rows and control in rows:
            entries = [compare("mm-sink", control, m) for m in ("caption_nll", "caption_nll_beyond")]
            lab = "; ".join(_values_text(rows, ["mm-sink", control], m) for m in ("caption_nll", "caption_nll_beyond"))
            out.append(_finding(claim, "not in the paper: a control of the lab", lab, entries, NEUTRAL_CONTROL))
    # h) Table 4: stage 3 against stage 1, paired over the same units
    if records:
        t4_groups = table4_groups(records, load_features)
        t4_compare = Comparisons(t4_groups, t4["rows"], judges)
    else:
        t4_compare = Comparisons({}, t4["rows"], judges)
    pairs = t4.get("regressed_test_pairs") or {}
    for mode in ("official", "full"):
        if "off" not in t4["rows"] or mode not in t4["rows"]:
            continue
        entries = [t4_compare(mode, "off", m) for m in ("fid", "char_acc")]
        held_out = (pairs.get(mode) or {}).get("paired")
        if held_out:  # the claim must hold on the stories and on stage 3's own held-out pairs: the weaker decides
            entries = all_of([entries[0], _held_out_entry(mode, held_out, "fid_gain", "fid")]) + entries[1:]
            entries.append(_held_out_entry(mode, held_out, "character_accuracy_gain", "char_acc"))
        lab = "; ".join(_values_text(t4["rows"], ["off", mode], m) for m in ("fid", "char_acc"))
        if mode in pairs:
            b, a = pairs[mode]["before"], pairs[mode]["after"]
            lab += (
                f"; stage 3's own held-out regressed pairs (totals, no interval): FID-analogue {b['fid']:.3f} → "
                f"{a['fid']:.3f}, identity {b['char_acc']:.1%} → {a['char_acc']:.1%}"
            )
        out.append(
            _finding(
                f"Adapting the de-tokenizer to regressed features (stage 3, {mode} mode) improves FID (Table 4).",
                f"FID {PAPER_TABLE4['fid_before']} -> {PAPER_TABLE4['fid_after']}",
                lab,
                entries,
                NEUTRAL_STAGE3,
            )
        )
    # i) the unflattering evidence: caption perplexity of every policy, and the 100-segment stress runs
    ranked = [name for name in rows if rows[name].get("caption_nll") is not None or rows[name].get("perplexity")]
    if "mm-sink" in ranked and len(ranked) > 1:
        entries = all_of([compare("mm-sink", other, "caption_nll") for other in ranked if other != "mm-sink"])
        if all(rows[n].get("caption_nll") is not None for n in ranked):
            order = sorted(ranked, key=lambda n: rows[n]["caption_nll"])
            lab = "teacher-forced caption perplexity (exp of the mean per-story NLL), best first: " + ", ".join(
                f"{n} {_perplexity_text(rows[n])}" for n in order
            )
        else:
            order = sorted(ranked, key=lambda n: rows[n].get("perplexity") or math.inf)
            lab = "teacher-forced caption perplexity per cell (no per-story scores), best first: " + ", ".join(
                f"{n} {_fmt(rows[n].get('perplexity'))}" for n in order
            )
        out.append(
            _finding(
                "(Lab check, not a paper claim) The multimodal sink gives the lowest teacher-forced caption "
                "perplexity of all policies at 25 segments.",
                "the paper reports no text metric",
                lab,
                entries,
                NEUTRAL_PERPLEXITY,
            )
        )
    stressed = stress_groups(records, load_features) if records else {}
    if "sink" in stressed and "mm-sink" in stressed:
        stress_rows = stress_rows if stress_rows is not None else stress(records, load_features)
        stress_compare = Comparisons(stressed, stress_rows, judges)
        metrics = ["char_acc", "fid", "clip"] + (["caption_nll_beyond"] if stressed["sink"].story_keys else [])
        entries = [stress_compare("mm-sink", "sink", m) for m in metrics]
        lab = "; ".join(_values_text(stress_rows, ["mm-sink", "sink"], m) for m in metrics)
        lab += "; time at segment ~100 / ~10: " + ", ".join(
            f"{p} {stress_rows[p]['seconds_ratio_100_vs_10']:.2f}x" for p in ("mm-sink", "sink")
        )
        out.append(
            _finding(
                "At 100 segments (ten times the training length) the multimodal sink keeps the protagonist better "
                "than StreamingLLM's sink.",
                "the paper's long-story claim: mm-sink stays consistent far beyond the training length",
                lab,
                entries,
                NEUTRAL_STRESS,
            )
        )
    return out
