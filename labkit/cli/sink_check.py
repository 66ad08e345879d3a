"""`labkit sink-check`: does the trained MLLM carry an attention sink, and what does evicting it cost?

The lab's target (issue 13), measured on test stories: attention from queries past position 32 to BOS is at least
5x uniform in at least one layer, both on full multimodal stories and on their captions fed as plain text to the
saved `llm/` folder; and with the window at the training length, window's caption NLL after the first eviction is
at least 1.5x sink's while sink and mm-sink stay within 1.15x of their NLL inside the training length.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TARGET, WINDOW_TARGET, FLAT_TARGET = 5.0, 1.5, 1.15


def sink_check(preset_name: str, stories: int = 6, out: Path | str | None = None, progress: bool = True) -> dict:
    from labkit.core.artifacts import require
    from labkit.core.atomic import write_text
    from labkit.core.presets import get_preset
    from labkit.data.frames import load_frames
    from labkit.data.storystream_mini import ensure_dataset
    from labkit.experiments.sink_emergence import mllm_sink_evidence
    from labkit.training.registry import load
    from labkit.training.stage0 import features_for_split
    from labkit.training.stage2 import LLM

    preset = get_preset(preset_name)
    model, tokenizer, _ = load("mllm", preset)
    root = ensure_dataset(preset, progress)
    frames = load_frames(root, "test")
    features = features_for_split(preset, "test", root, progress)
    evidence = mllm_sink_evidence(
        model, tokenizer, frames, features, require("mllm", preset.name) / LLM, preset, stories
    )
    multimodal = evidence["bos_multimodal"]["mean_over_heads"]
    plain = evidence["bos_plain_captions"]["mean_over_heads"]
    evidence["targets"] = {
        "bos_layers_at_5x_multimodal": sum(r >= BOS_TARGET for r in multimodal),
        "bos_layers_at_5x_plain": sum(r >= BOS_TARGET for r in plain),
        "bos_met": max(multimodal) >= BOS_TARGET and max(plain) >= BOS_TARGET,
        "window_over_sink_met": evidence["window_over_sink_beyond"] >= WINDOW_TARGET,
        "sink_flat_met": evidence["sink_beyond_over_within"] <= FLAT_TARGET,
        "mm_sink_flat_met": evidence["mm_sink_beyond_over_within"] <= FLAT_TARGET,
    }
    if out is not None:
        write_text(Path(out), json.dumps(evidence, indent=1) + "\n")
    return evidence


def format_sink_check(evidence: dict) -> str:
    lines = [
        f"{evidence['stories']} test stories of {evidence['segments']} segments, window {evidence['window_tokens']}"
    ]
    for name in ("bos_multimodal", "bos_plain_captions"):
        ratios = ", ".join(f"{r:.2f}" for r in evidence[name]["mean_over_heads"])
        lines.append(f"BOS ratio per layer ({name.removeprefix('bos_')}): {ratios}")
    for policy, v in evidence["teacher_forced"].items():
        lines.append(
            f"{policy:<8} caption NLL within the training length {v['nll_within']:.3f}, beyond {v['nll_beyond']:.3f}"
        )
    lines.append(
        f"window / sink beyond: {evidence['window_over_sink_beyond']:.2f}x (target >= {WINDOW_TARGET}); sink beyond / "
        f"within: {evidence['sink_beyond_over_within']:.2f}x, mm-sink: {evidence['mm_sink_beyond_over_within']:.2f}x "
        f"(target <= {FLAT_TARGET})"
    )
    lines.append(f"targets: {json.dumps(evidence['targets'])}")
    return "\n".join(lines)
