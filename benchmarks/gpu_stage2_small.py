"""GPU check for stage 2 at the `small` preset: a few hundred bf16 training steps; steps/s and peak memory.

Run on a machine with a CUDA GPU from the repository root (no install needed beyond torch, transformers,
accelerate, tokenizers, pillow, tqdm):

    PYTHONPATH=. python benchmarks/gpu_stage2_small.py --steps 300 --out gpu_stage2_small.json

The features come from the small preset's visual tokenizer at its random initialisation: this run measures
speed and memory of the real stage-2 code path (Accelerate, bf16 autocast, real layouts), not quality.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stories", type=int, default=96)
    parser.add_argument("--out", default="gpu_stage2_small.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same code on the CPU (a check of the script)")
    args = parser.parse_args()

    from labkit.core.presets import get_preset
    from labkit.data.frames import load_frames, to_float
    from labkit.data.storystream_mini import MakeConfig, load_tokenizer, make_dataset
    from labkit.models.visual_tokenizer import VisualTokenizer
    from labkit.training.loop import Schedule, train
    from labkit.training.stage2 import StoryChunks, build_model, evaluate, make_batch_fn, validation_batches

    if not args.cpu_smoke:
        assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    cuda = device.type == "cuda"
    preset = get_preset("small")
    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    data = preset.data
    make_dataset(
        work / "data",
        MakeConfig(
            train_stories=args.stories,
            val_stories=8,
            test_stories=2,
            frames=30,
            size=data.image_size,
            seed=0,
            bpe_merges=data.bpe_merges,
            image_tokens=data.image_tokens,
        ),
        progress=False,
    )
    data_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(work / "data")
    torch.manual_seed(0)
    vit = VisualTokenizer(preset.visual_tokenizer).to(device).eval()

    def features(split: str) -> tuple[list[list[str]], torch.Tensor]:
        frames = load_frames(work / "data", split)
        flat = frames.images.flatten(0, 1)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = torch.cat(
                [vit(to_float(flat[i : i + 256]).to(device)).float().cpu() for i in range(0, len(flat), 256)]
            )
        return frames.captions, out.reshape(frames.stories, frames.frames, *out.shape[1:])

    train_chunks = StoryChunks.from_split(*features("train"), data.chunk_length)
    val_chunks = StoryChunks.from_split(*features("val"), data.chunk_length)
    model = build_model(preset, tokenizer).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    val = validation_batches(val_chunks, tokenizer, preset, samples=32)
    before = evaluate(model.eval(), val)
    schedule = Schedule(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=3e-4,
        warmup=30,
        checkpoint_every=args.steps,
        eval_every=args.steps,
        mixed_precision="bf16",
    )
    make_batch = make_batch_fn(train_chunks, tokenizer, preset, "random-length", seed=2)
    tokens = sum(make_batch(s, range(args.batch_size)).tokens for s in range(5)) / 5
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    result = train(
        model,
        make_batch,
        lambda m, b: (lambda o: (o.loss, {}))(m(b.to(device))),
        schedule,
        work / "run",
        resume=False,
        progress=False,
    )
    if cuda:
        torch.cuda.synchronize()
    after = evaluate(model.eval(), val)
    report = {
        "check": "stage 2, small preset, bf16",
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)",
        "torch": torch.__version__,
        "parameters": parameters,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "mean_tokens_per_batch": tokens,
        "train_seconds": round(result.seconds, 2),
        "steps_per_second": round(args.steps / result.seconds, 2),
        "tokens_per_second": round(args.steps * tokens / result.seconds),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "data_seconds": round(data_seconds, 1),
        "val_before": before,
        "val_after": after,
        "note": "features from a randomly initialised small visual tokenizer: speed and memory only",
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
