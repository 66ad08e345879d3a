"""Findings say only what their evidence allows: verdicts from paired bootstrap intervals over synthetic grids."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from labkit.metrics.scores import frechet_distance
from labkit.report.findings import findings
from labkit.report.paper_tables import _Frechet, stress, table2, table4

SEEDS, STORIES, SEGMENTS, CHANNELS = 2, 8, 25, 8  # 16 (seed, story) units per cell
TRUSTED = {"test_clip_top1": 0.99}


def _noise(seed: int, size: int, scale: float) -> list[float]:
    return (np.random.default_rng(seed).normal(scale=scale, size=size)).tolist()


def _features(shift: float) -> dict:
    torch.manual_seed(0)  # the same base tensors for every cell: only `shift` tells policies apart
    generated = torch.randn(SEEDS * STORIES, SEGMENTS - 1, CHANNELS)
    real = torch.randn(40, CHANNELS)
    return {"generated": generated + shift, "real": real}


def cell(policy, adaptation="full", nll=2.0, clip=0.5, char_acc=0.5, shift=0.0, noise=0.0, kv=1000, segments=25):
    """A synthetic cell record as `story_ablation.run_cell` writes it, with its FID features under `_features`."""
    units, salt = SEEDS * STORIES, zlib.crc32(policy.encode()) * 10  # each policy its own noise
    seeds = [s for s in range(SEEDS) for _ in range(STORIES)]
    stories = [s * STORIES + k for s in range(SEEDS) for k in range(STORIES)]
    unit_metrics = {
        "seed": seeds,
        "story": stories,
        "clip": [clip + e for e in _noise(salt + 1, units, noise / 10)],
        "char_acc": [char_acc + e for e in _noise(salt + 2, units, noise / 10)],
        "style_consistency": [0.9] * units,
    }
    per_story = {
        "story": stories,
        "caption_nll": [nll + e for e in _noise(salt + 3, units, noise)],
        "caption_nll_within": [1.5] * units,
        "caption_nll_beyond": [nll + e for e in _noise(salt + 4, units, noise)],
        "feature_cosine_error": [0.1] * units,
    }
    overall = {"fid": 1.0, "clip": clip, "char_acc": char_acc, "style_consistency": 0.9, "lpips": None}
    return {
        "run": f"{policy}-{adaptation}-{segments}",
        "parameters": {
            "policy": policy,
            "segments": segments,
            "adaptation": adaptation,
            "seed": 0,
            "seeds": SEEDS,
            "budget": "training",
            "window": 256,
        },
        "metrics": {
            "overall": overall,
            "units": unit_metrics,
            "teacher_forced": {"perplexity": float(np.exp(nll)), "feature_cosine_error": 0.1, "per_story": per_story},
        },
        "files": {"fid_features": "fid_features.safetensors"},
        "timings": {
            "seconds_per_segment": 0.1,
            "kv_bytes_last_segment": kv * 10,
            "kv_entries_last_segment": kv,
            "seconds": [0.1] * segments,
            "kv_bytes": [kv * 10] * segments,
            "kv_entries": [kv] * segments,
        },
        "_features": _features(shift),
    }


def load_features(record: dict) -> dict | None:
    return record.get("_features")


def report(records, judges=TRUSTED):
    t2, t4 = table2(records, load_features), table4(records, load_features=load_features)
    return t2, t4, findings(t2, t4, records, judges=judges, load_features=load_features)


def by_claim(result: list[dict], start: str) -> dict:
    return next(f for f in result if f["claim"].startswith(start))


def all_entries(finding: dict) -> list[dict]:
    return [finding] + finding["evidence"]


POLICIES = ("dense", "window", "sink", "mm-sink", "mm-sink-as-coded", "recompute-window")


def test_fast_frechet_statistic_equals_the_metric():
    features = _features(0.3)
    statistic = _Frechet(features["generated"].numpy(), features["real"].numpy())
    indices = np.array([0, 0, 3, 5, 5, 5, 9])
    expected = frechet_distance(features["generated"][indices].flatten(0, 1), features["real"])
    assert statistic(indices) == pytest.approx(expected, rel=1e-7)


def test_policies_that_all_hold_everything_give_only_inconclusive_verdicts():
    records = [cell(p) for p in POLICIES] + [cell("mm-sink", a) for a in ("off", "official")]
    t2, t4, result = report(records)
    assert t2["rows"]["dense"]["seeds"] == SEEDS and t2["rows"]["dense"]["n"] == SEEDS * STORIES
    assert t2["rows"]["dense"]["ci95"]["fid"][0] is not None  # the FID-analogue has an interval from features
    assert result and all(f["verdict"] == "inconclusive" for f in result)
    for finding in result:
        for entry in all_entries(finding):
            assert entry["verdict"] == "inconclusive"
            if entry["ci95"][0] is not None and entry["metric"] not in ("kv_entries", "kv_bytes"):
                assert entry["difference"] == pytest.approx(0.0, abs=1e-9)
                assert entry["ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert all("reproduced" not in f or isinstance(f.get("reproduced"), str) for f in result)
    assert all("why_not" not in f for f in result)


def test_a_large_difference_in_the_papers_direction_is_reproduced():
    records = [
        cell("mm-sink", nll=1.0, clip=0.7, char_acc=0.9, shift=0.0, noise=0.1, kv=400),
        cell("window", nll=3.0, clip=0.3, char_acc=0.2, shift=2.0, noise=0.1),
        cell("sink", nll=2.0, clip=0.5, char_acc=0.5, shift=1.0, noise=0.1),
        cell("dense", nll=1.5, clip=0.6, char_acc=0.6, shift=0.5, noise=0.1, kv=4000),
    ]
    _, _, result = report(records)
    versus_window = by_claim(result, "The multimodal attention sink gives better stories than window")
    assert versus_window["metric"] == "caption_nll_beyond" and versus_window["verdict"] == "reproduced"
    assert versus_window["difference"] == pytest.approx(2.0, abs=0.1) and versus_window["n"] == SEEDS * STORIES
    low, high = versus_window["ci95"]
    assert 0 < low < versus_window["difference"] < high and versus_window["why"] is None
    assert {e["metric"]: e["verdict"] for e in versus_window["evidence"]} == {"fid": "reproduced", "clip": "reproduced"}
    assert by_claim(result, "StreamingLLM's attention sink is better")["verdict"] == "reproduced"
    assert by_claim(result, "Window attention is the worst")["verdict"] == "reproduced"
    memory = by_claim(result, "Dense attention needs the most memory")
    assert memory["verdict"] == "reproduced" and memory["ci95"] == [3600, 3600] and memory["n"] == 1
    speed = by_claim(result, "The multimodal sink is faster than dense")
    assert speed["verdict"] == "inconclusive" and "one timing per cell" in speed["why"]


def test_the_reverse_difference_is_contradicted():
    records = [
        cell("mm-sink", nll=3.0, clip=0.3, shift=2.0, noise=0.1),
        cell("window", nll=1.0, clip=0.7, shift=0.0, noise=0.1),
    ]
    _, _, result = report(records)
    versus_window = by_claim(result, "The multimodal attention sink gives better stories than window")
    assert versus_window["verdict"] == "contradicted" and versus_window["ci95"][1] < 0
    assert "other side of 0" in versus_window["why"]
    assert {e["metric"]: e["verdict"] for e in versus_window["evidence"]} == {
        "fid": "contradicted",
        "clip": "contradicted",
    }


def test_a_judge_below_its_trust_bar_makes_clip_comparisons_inconclusive():
    records = [cell("mm-sink", clip=0.7, noise=0.1), cell("window", clip=0.3, noise=0.1)]
    _, _, result = report(records, judges={"test_clip_top1": 0.525})
    clip = next(e for e in by_claim(result, "The multimodal attention sink")["evidence"] if e["metric"] == "clip")
    assert clip["verdict"] == "inconclusive" and clip["ci95"][0] > 0  # the interval is reported anyway
    assert "below its trust bar (top-1 52.5%" in clip["why"]


def test_stage3_is_paired_over_units_and_records_without_units_are_inconclusive():
    records = [cell("mm-sink", "off", char_acc=0.3, shift=1.5, noise=0.1), cell("mm-sink", "full", char_acc=0.8)]
    _, t4, result = report(records)
    assert t4["rows"]["off"]["n"] == SEEDS * STORIES and t4["rows"]["full"]["ci95"]["char_acc"][0] is not None
    stage3 = by_claim(result, "Adapting the de-tokenizer to regressed features (stage 3, full mode)")
    assert stage3["metric"] == "fid" and stage3["verdict"] == "reproduced"
    assert stage3["evidence"][0]["metric"] == "char_acc" and stage3["evidence"][0]["verdict"] == "reproduced"

    old = [cell(p, nll=n) for p, n in (("mm-sink", 1.0), ("window", 3.0))]
    for record in old:
        del record["metrics"]["units"], record["metrics"]["teacher_forced"]["per_story"]
    _, _, result = report(old)
    finding = by_claim(result, "The multimodal attention sink gives better stories than window")
    assert finding["verdict"] == "inconclusive" and finding["ci95"] == [None, None] and finding["n"] == SEEDS
    assert "no per-story evidence" in finding["why"]


def test_the_report_is_deterministic_and_stress_has_intervals():
    records = [cell(p, noise=0.2, shift=s) for p, s in (("mm-sink", 0.0), ("window", 0.5))]
    records += [cell(p, "off", segments=100, char_acc=a, noise=0.1) for p, a in (("sink", 0.3), ("mm-sink", 0.8))]
    first, second = report(records)[2], report(records)[2]
    assert first == second
    rows = stress(records, load_features)
    assert rows["sink"]["n"] == SEEDS * STORIES and rows["sink"]["ci95"]["char_acc"][0] is not None
    assert by_claim(first, "At 100 segments")["verdict"] == "reproduced"
