"""GPU check for the KV-cache policies at real scale (issues 4 and 16): a Llama-2-7B-shaped SEED-Story MLLM with
random weights in bf16 writes story segments (text + image slots, no de-tokenizer) under each policy; seconds per
segment, KV bytes and peak memory are recorded - the time and memory columns of the paper's Table 2, at the paper's
sizes (Q = 64 image slots, 256×4096 features), at 25 segments (Table 2) and 100 (ten times the training length).

    PYTHONPATH=. python3 benchmarks/gpu_paper_generation.py --out gpu_paper_generation.json   # issue 4: 25 segments
    PYTHONPATH=. python3 benchmarks/gpu_paper_generation.py --segments 25,100 \
        --policies dense,window,sink,mm-sink,mm-sink-as-coded,recompute-window \
        --out benchmarks/results/gpu_paper_generation_100.json                              # issue 16

Random weights: captions are forced to a fixed length (`--caption-tokens`, about the paper's 146 characters),
so every policy does the same work; quality is not measured here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(preset_name: str, vocab: int, device: torch.device):
    """The model built directly on the device in bf16 (random initialisation, buffers computed there)."""
    from labkit.core.presets import get_preset
    from labkit.models.mllm import SeedStoryMLLM

    preset = get_preset(preset_name)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = SeedStoryMLLM(preset, vocab, lora=False)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--segments", default="25", help="story lengths, comma-separated (e.g. 25,100)")
    parser.add_argument("--policies", default="dense,mm-sink,recompute-window", help="comma-separated")
    parser.add_argument("--caption-tokens", type=int, default=36)
    parser.add_argument("--out", default="gpu_paper_generation.json")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()

    from labkit.data.storystream_mini import load_tokenizer
    from labkit.inference.generate import generate_story

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    tokenizer = load_tokenizer("data_samples/storystream-mini")
    from labkit.core.presets import get_preset
    from labkit.models.mllm import paper_vocab_size

    vocab = paper_vocab_size(get_preset(args.preset)) if args.preset == "paper" else tokenizer.vocab_size + 64
    start = time.perf_counter()
    model, preset = build(args.preset, vocab, device)
    build_seconds = time.perf_counter() - start
    segment_tokens = args.caption_tokens + 1 + preset.mllm.num_queries + 2
    window = 10 * segment_tokens  # the paper's sink window = the training length, 10 segments
    known = {
        "dense": {},
        "window": {"window": window},
        "sink": {"sink": 4, "window": window},
        "mm-sink": {"sink": 4, "window": window, "cap": window + 4 + 24 * 16},
        "mm-sink-as-coded": {"window_images": 8},  # the official slicing keeps 8 images (vis_george_sink.py)
        "recompute-window": {},
    }
    unknown = sorted(set(args.policies.split(",")) - set(known))
    if unknown:
        parser.error(f"--policies: unknown {unknown}; choose from {', '.join(known)}")
    policies = {name: known[name] for name in args.policies.split(",")}
    lengths = [int(n) for n in args.segments.split(",")]
    first = torch.randn(
        preset.visual_tokenizer.num_features, preset.visual_tokenizer.feature_dim, device=device, dtype=torch.bfloat16
    )
    opening = "Once upon a time, Mira, a small red round creature with a yellow hat, lived in the quiet forest."
    report = {
        "check": f"{args.segments} story segments at the paper's sizes, random bf16 weights",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 1),
        "caption_tokens": args.caption_tokens,
        "image_slots": preset.mllm.num_queries,
        "policies": {},
    }
    import transformers

    report["transformers"] = transformers.__version__
    with torch.autocast(device.type, dtype=torch.bfloat16):
        generate_story(
            model, tokenizer, opening, first, 2, "dense", {}, max_caption_tokens=4, fixed_caption_tokens=True
        )  # warm-up
        for (policy, params), segments in ((p, n) for p in policies.items() for n in lengths):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            run = generate_story(
                model,
                tokenizer,
                opening,
                first,
                segments,
                policy,
                params,
                recompute_segments=8,
                max_caption_tokens=args.caption_tokens,
                fixed_caption_tokens=True,
            )
            steps = run.steps
            key = policy if len(lengths) == 1 else f"{policy}@{segments}"
            report["policies"][key] = {
                "segments": segments,
                "params": params,
                "seconds_per_segment": [round(s.seconds, 4) for s in steps],
                "mean_seconds_per_segment_last5": round(sum(s.seconds for s in steps[-5:]) / 5, 4),
                # a segment writes caption_tokens + <img> + Q slots + </img> (+ [INST]) tokens
                "mean_seconds_per_token_last5": round(sum(s.seconds for s in steps[-5:]) / 5 / segment_tokens, 5),
                "kv_bytes_per_segment": [s.kv_bytes for s in steps],
                "kv_gib_at_end": round(steps[-1].kv_bytes / 2**30, 3),
                "kv_entries_at_end": steps[-1].kv_entries,
                "tokens": len(run.token_ids),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if device.type == "cuda"
                else None,
            }
            print(
                policy,
                json.dumps({k: v for k, v in report["policies"][key].items() if "per_segment" not in k}),
                flush=True,
            )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
