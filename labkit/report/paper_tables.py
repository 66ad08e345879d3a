"""The paper's Table 2 and Table 4 beside the lab's numbers, and the findings they support (issue 6).

Everything here is computed from the grid's cell records (`story_ablation.run_cell` writes them); the paper's
values are quoted from the paper (Table 2; Table 4 in App. B). A finding's verdict is a rule applied to the numbers -
never typed in - and its `why_not` explains, where a finding does not reproduce, the reason the lab has
measured elsewhere (named notebook), so a negative result is never silent.
"""

from __future__ import annotations

from statistics import mean

# Paper Table 2 (length not stated; time and memory averaged over 50 sequences on one A800).
PAPER_TABLE2 = {
    "dense": {"fid": 119.72, "clip": 0.705, "seconds": 569.67, "memory_gb": 37.99},
    "window": {"fid": 334.90, "clip": 0.598, "seconds": 450.64, "memory_gb": 30.81},
    "sink": {"fid": 221.53, "clip": 0.676, "seconds": 451.94, "memory_gb": 30.81},
    "mm-sink": {"fid": 79.67, "clip": 0.728, "seconds": 473.98, "memory_gb": 31.82},
}
PAPER_TABLE4 = {"fid_before": 153.93, "fid_after": 99.79}  # App. B: de-tokenizer before / after stage 3
TABLE2_POLICIES = ("dense", "window", "sink", "mm-sink", "mm-sink-as-coded", "recompute-window")
TABLE2_SEGMENTS = 25
# The paper's Table 2 uses its adapted de-tokenizer (it says: fully fine-tuned); the lab takes the first present.
TABLE2_ADAPTATIONS = ("full", "official", "off")
TABLE4_POLICY = "mm-sink"


def _cells(records: list[dict], **where) -> list[dict]:
    return [r for r in records if all(r["parameters"].get(k) == v for k, v in where.items())]


def _average(cells: list[dict], path: tuple[str, ...]) -> float | None:
    """Mean over seeds of a metric at `path` in each record; None if any seed lacks it."""
    values = []
    for cell in cells:
        value = cell
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return None
        values.append(value)
    return mean(values) if values else None


def table2(records: list[dict]) -> dict:
    """Per policy at 25 segments: image metrics (adapted de-tokenizer), speed, KV bytes, teacher-forced text.
    Time and memory come from the same cells as the images (a policy's generation is the same whatever draws it)."""
    present = [a for a in TABLE2_ADAPTATIONS if _cells(records, segments=TABLE2_SEGMENTS, adaptation=a)]
    adaptation = present[0] if present else None
    rows = {}
    for policy in TABLE2_POLICIES:
        cells = _cells(records, policy=policy, segments=TABLE2_SEGMENTS, adaptation=adaptation)
        every = _cells(records, policy=policy, segments=TABLE2_SEGMENTS)  # generation is the same for every adaptation
        scored = [c for c in every if c["metrics"].get("teacher_forced")]
        if not every:
            continue
        rows[policy] = {
            **{
                k: _average(cells, ("metrics", "overall", k))
                for k in ("fid", "clip", "char_acc", "style_consistency", "lpips")
            },
            "seconds_per_segment": _average(cells or every, ("timings", "seconds_per_segment")),
            "kv_bytes": _average(cells or every, ("timings", "kv_bytes_last_segment")),
            "perplexity": _average(scored, ("metrics", "teacher_forced", "perplexity")),
            "feature_cosine_error": _average(scored, ("metrics", "teacher_forced", "feature_cosine_error")),
            "seeds": len(cells),
            "paper": PAPER_TABLE2.get(policy),
        }
    return {"segments": TABLE2_SEGMENTS, "adaptation": adaptation, "rows": rows}


def table4(records: list[dict], stage3_manifests: dict[str, dict] | None = None) -> dict:
    """FID-analogue and accuracies of mm-sink stories drawn before (off) and after adaptation (each mode),
    plus stage 3's own scores on regressed test pairs when its manifests are given."""
    rows = {}
    for adaptation in ("off", "official", "full"):
        cells = _cells(records, policy=TABLE4_POLICY, segments=TABLE2_SEGMENTS, adaptation=adaptation)
        if cells:
            rows[adaptation] = {
                k: _average(cells, ("metrics", "overall", k)) for k in ("fid", "char_acc", "style_consistency", "clip")
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
        }
    return {
        "policy": TABLE4_POLICY,
        "segments": TABLE2_SEGMENTS,
        "rows": rows,
        "regressed_test_pairs": pairs,
        "paper": PAPER_TABLE4,
    }


def stress(records: list[dict]) -> dict:
    """100-segment runs: time at segment 100 over segment 10 (target <= 1.15 for sink policies) and KV growth."""
    out = {}
    for cell in _cells(records, segments=100, adaptation="off"):
        seconds, kv = cell["timings"]["seconds"], cell["timings"]["kv_bytes"]
        late, early = mean(seconds[95:100]), mean(seconds[8:13])  # five segments around 100 and around 10
        out[cell["parameters"]["policy"]] = {
            "seconds_ratio_100_vs_10": late / early,
            "kv_bytes_10": kv[9],
            "kv_bytes_100": kv[99],
            "char_acc": cell["metrics"]["overall"]["char_acc"],
            "fid": cell["metrics"]["overall"]["fid"],
        }
    return out


def _verdict(checks: list[bool]) -> str | bool:
    return True if all(checks) else "partial" if any(checks) else False


def findings(t2: dict, t4: dict) -> list[dict]:
    """Each paper claim with the lab's evidence and `reproduced` (true / false / "partial")."""
    rows, out = t2["rows"], []

    def add(claim, paper, evidence, reproduced, why_not):
        out.append(
            {
                "claim": claim,
                "paper": paper,
                "lab": evidence,
                "reproduced": reproduced,
                "why_not": None if reproduced is True else why_not,
            }
        )

    four = [p for p in ("dense", "window", "sink", "mm-sink") if p in rows and rows[p]["fid"] is not None]
    if len(four) == 4:
        fid = {p: rows[p]["fid"] for p in four}
        clip = {p: rows[p]["clip"] for p in four}
        others = [p for p in four if p != "mm-sink"]
        add(
            "The multimodal attention sink gives the best FID and CLIP of the four mechanisms (Table 2).",
            "FID 79.67 vs 119.72 / 334.90 / 221.53; CLIP 0.728 vs 0.705 / 0.598 / 0.676",
            "FID-analogue "
            + ", ".join(f"{p} {fid[p]:.3f}" for p in four)
            + "; CLIP-analogue "
            + ", ".join(f"{p} {clip[p]:.3f}" for p in four),
            _verdict([fid["mm-sink"] < min(fid[p] for p in others), clip["mm-sink"] > max(clip[p] for p in others)]),
            "At 25 tiny segments the policies differ little: the tiny MLLM has no BOS sink to lose (notebook 05), so "
            "what a policy keeps barely changes the regressed features, "
            "and 4 stories x 24 images make the FID-analogue noisy.",
        )
        add(
            "Window attention is the worst mechanism: it collapses once the first tokens are evicted (Table 2).",
            "window FID 334.90, CLIP 0.598: the worst of the four",
            f"window FID-analogue {fid['window']:.3f} (worst: {max(fid, key=fid.get)}), "
            f"CLIP-analogue {clip['window']:.3f} (worst: {min(clip, key=clip.get)})",
            _verdict([max(fid, key=fid.get) == "window", min(clip, key=clip.get) == "window"]),
            "Window collapse needs attention sinks in most layers of a well-trained model; "
            "the tiny MLLM puts about uniform "
            "attention on BOS (notebook 05, sink emergence), so losing BOS does not derail it.",
        )
        add(
            "StreamingLLM's attention sink is better than window attention (Table 2).",
            "sink FID 221.53 vs window 334.90; CLIP 0.676 vs 0.598",
            f"sink FID-analogue {fid['sink']:.3f} vs window {fid['window']:.3f}; "
            f"CLIP-analogue {clip['sink']:.3f} vs {clip['window']:.3f}",
            _verdict([fid["sink"] < fid["window"], clip["sink"] > clip["window"]]),
            "Without a BOS sink in the tiny model, keeping 4 first tokens changes little "
            "(notebook 05 measures sink = window NLL).",
        )
    if "dense" in rows and "mm-sink" in rows and rows["mm-sink"]["kv_bytes"]:
        ratio = rows["dense"]["kv_bytes"] / rows["mm-sink"]["kv_bytes"]
        add(
            "Dense attention needs the most memory; the multimodal sink keeps it bounded (Table 2 memory column).",
            "37.99 GB dense vs 31.82 GB mm-sink (weights included)",
            f"KV cache at segment 25: dense {rows['dense']['kv_bytes'] / 1e6:.2f} MB "
            f"vs mm-sink {rows['mm-sink']['kv_bytes'] / 1e6:.2f} MB ({ratio:.2f}x; lab target >= 2x)",
            ratio > 1,
            "The mm-sink cap is larger than 25 tiny segments' worth of tokens.",
        )
        speed = rows["dense"]["seconds_per_segment"] / rows["mm-sink"]["seconds_per_segment"]
        add(
            "The multimodal sink is faster than dense attention (Table 2 time column).",
            "473.98 s vs 569.67 s",
            f"seconds per segment: dense {rows['dense']['seconds_per_segment']:.3f}, "
            f"mm-sink {rows['mm-sink']['seconds_per_segment']:.3f} ({speed:.2f}x)",
            speed > 1,
            "At 25 tiny segments dense attention over ~1k tokens is cheap on a CPU; the cache bookkeeping "
            "(re-rotating kept keys) costs about as much as the attention it saves.",
        )
    if "recompute-window" in rows and "mm-sink" in rows:
        ratio = rows["recompute-window"]["seconds_per_segment"] / rows["mm-sink"]["seconds_per_segment"]
        add(
            "(Lab target, not a paper claim) The sink cache is >= 10x faster per segment than the released code's "
            "recompute-window, which re-encodes 8 segments every time (official issue #36).",
            "the paper does not time recompute-window; it is what the released code runs",
            f"recompute-window / mm-sink seconds per segment: {ratio:.2f}x",
            _verdict([ratio >= 10, ratio > 1]),
            "A tiny model's forward pass is dominated by per-call overhead, not by the 8 re-encoded segments "
            "(a few hundred tokens), so recomputing costs little on a CPU; the gap grows with model size.",
        )
    if (
        "mm-sink" in rows
        and "mm-sink-as-coded" in rows
        and rows["mm-sink"]["perplexity"]
        and rows["mm-sink-as-coded"]["perplexity"]
    ):
        a, b = rows["mm-sink"]["perplexity"], rows["mm-sink-as-coded"]["perplexity"]
        add(
            "(Lab finding, official code) Keeping keys without re-rotating them (mm-sink as coded) costs accuracy.",
            "the paper's sink is never run by the released code (issue #36)",
            f"teacher-forced caption perplexity over 25 segments: mm-sink {a:.3f} vs as coded {b:.3f}",
            b > a,
            "Stale RoPE positions matter only once entries are evicted; with 25 tiny segments little is evicted.",
        )
    t4rows = t4["rows"]
    if "off" in t4rows and any(m in t4rows for m in ("official", "full")):
        modes = [m for m in ("official", "full") if m in t4rows]
        add(
            "Adapting the de-tokenizer to regressed features (stage 3) improves FID (Table 4).",
            "FID 153.93 -> 99.79",
            "FID-analogue of mm-sink stories: before "
            + f"{t4rows['off']['fid']:.3f}; "
            + "; ".join(
                f"{m} {t4rows[m]['fid']:.3f} (identity {t4rows[m]['char_acc']:.1%} vs {t4rows['off']['char_acc']:.1%})"
                for m in modes
            ),
            _verdict([t4rows[m]["fid"] < t4rows["off"]["fid"] for m in modes]),
            "At tiny scale regressed features are already close to true ones (cosine error ~0.06) and the stage-1 "
            "de-tokenizer is itself undertrained (identity ~50% from true features), "
            "so stage 3 has little gap to close.",
        )
    return out
