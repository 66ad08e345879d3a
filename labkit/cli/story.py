"""`labkit story`: one long story under one KV-cache policy, written to a folder (paper §3.2, §4.2).

    labkit story --preset paper --policy mm-sink --segments 25 --out story/ --image first.png --caption "..."

As the official `src/inference/gen_george.py`: the opening (`<s>` + the first caption + the first image's ViT
features in its 64 slots) is continued segment by segment, each written caption followed by an image regressed
by the MLLM and fed back; here the KV cache follows `--policy` (`labkit.inference.generate`). Every segment's
features then go through the de-tokenizer (the opening's too, drawn back from its ViT features).

- `tiny` / `small`: the trained checkpoints (`labkit train ...`); without `--image`, the opening is the first test
  story of the preset's data set (its first frame and caption).
- `paper`: everything from `$LABKIT_WEIGHTS` (`labkit.models.paper_weights`; README, "Real weights"); `--image`
  and `--caption` are required.

Output, built in a temporary folder and renamed: `story.json` (captions per segment, the policy and its
parameters, KV entries, bytes and seconds per segment), `images/segment_01.png`.., `strip.png` (segments 1, 10,
25 and the last, as the paper's figures).

Defaults follow the paper: the window is the training length (10 segments, estimated from the opening segment's
tokens), mm-sink's cap adds the zones of 8 evicted images, `recompute-window` keeps 8 segments
(`vis_george_sink.py`'s `window_size`); the paper preset samples 50 Euler steps at guidance 7.5 (the official
scripts), the lab's presets 10 steps at 3.0 (the report's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from labkit.core.errors import ParameterError

# per preset kind: (de-tokenizer steps, guidance scale, longest caption in tokens)
PAPER_SAMPLING = (50, 7.5, 120)  # official scripts: num_inference_steps=50, guidance_scale=7.5
LAB_SAMPLING = (10, 3.0, 40)  # the report's cells (labkit.experiments.story_ablation.CellConfig)


def add_story_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny, small or paper (real weights from $LABKIT_WEIGHTS)")
    parser.add_argument(
        "--policy",
        default="mm-sink",
        help="dense, window, sink, mm-sink, mm-sink-as-coded, recompute-window, or the controls mm-sink-stale "
        "and mm-sink-as-coded-rerotated",
    )
    parser.add_argument("--segments", type=int, default=25, help="segments, the given opening included")
    parser.add_argument("--out", required=True, help="output folder (story.json, images/, strip.png)")
    parser.add_argument("--image", help="opening image (PNG/JPEG); required at paper")
    parser.add_argument("--caption", help="opening caption; required with --image")
    parser.add_argument("--seed", type=int, default=42, help="the de-tokenizer's noise seed (the official 42)")
    parser.add_argument("--device", help="auto (CUDA when torch sees a GPU), cpu or cuda")
    parser.add_argument("--window", type=int, help="recent tokens kept (default: the training length)")
    parser.add_argument("--sink", type=int, default=4, help="first tokens kept (sink, mm-sink)")
    parser.add_argument("--cap", type=int, help="mm-sink's entry bound (default: window + sink + 8 images' zones)")
    parser.add_argument("--window-images", type=int, default=8, help="images kept by mm-sink-as-coded")
    parser.add_argument("--recompute-segments", type=int, default=8, help="segments re-encoded by recompute-window")
    parser.add_argument("--max-caption-tokens", type=int, help="longest caption (default: tiny/small 40, paper 120)")
    parser.add_argument(
        "--fixed-caption-tokens",
        action="store_true",
        help="write every caption exactly --max-caption-tokens long (a known layout for smoke tests)",
    )
    parser.add_argument("--steps", type=int, help="de-tokenizer Euler steps (default: paper 50, else 10)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: paper 7.5, else 3.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--quiet", action="store_true")


def run_story(args: argparse.Namespace) -> int:
    record = tell_story(
        preset=args.preset,
        policy=args.policy,
        segments=args.segments,
        out=args.out,
        image=args.image,
        caption=args.caption,
        seed=args.seed,
        device=args.device,
        window=args.window,
        sink=args.sink,
        cap=args.cap,
        window_images=args.window_images,
        recompute_segments=args.recompute_segments,
        max_caption_tokens=args.max_caption_tokens,
        fixed_caption_tokens=args.fixed_caption_tokens,
        steps=args.steps,
        guidance=args.guidance,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    last = record["steps"][-1]
    print(
        f"wrote {args.out}: {record['segments']} segments under {record['policy']}; the cache holds "
        f"{last['kv_entries']} entries ({last['kv_bytes']:,} bytes) after the last; "
        f"{record['seconds']['generate']:.1f} s writing, {record['seconds']['draw']:.1f} s drawing"
    )
    return 0


def tell_story(
    preset: str,
    policy: str,
    segments: int,
    out: Path | str,
    image: Path | str | None = None,
    caption: str | None = None,
    seed: int = 42,
    device: str | None = None,
    window: int | None = None,
    sink: int = 4,
    cap: int | None = None,
    window_images: int = 8,
    recompute_segments: int = 8,
    max_caption_tokens: int | None = None,
    fixed_caption_tokens: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Load, generate, de-tokenize and write one story (see the module docstring); return story.json's record.
    Every parameter is checked, and every missing weight listed, before any model is loaded."""
    from labkit.core.atomic import build_directory
    from labkit.core.devices import resolve_device
    from labkit.core.presets import get_preset
    from labkit.experiments.story_ablation import CellConfig

    config = get_preset(preset)
    chosen = PAPER_SAMPLING if config.pretrained_weights else LAB_SAMPLING
    steps, guidance = steps or chosen[0], chosen[1] if guidance is None else guidance
    max_caption_tokens = max_caption_tokens or chosen[2]
    cell = CellConfig(
        policy=policy,
        segments=segments,
        seed=seed,
        stories=1,
        window=window,
        sink=sink,
        cap=cap or 10**9,  # the default needs the tokenizer: set once the models are loaded
        window_images=window_images,
        recompute_segments=recompute_segments,
        sample_steps=steps,
        guidance_scale=guidance,
        teacher_forced=False,
        preset=preset,
    )
    cell.check()  # names the bad parameter (policy, segments, window, ...) before anything loads
    if max_caption_tokens < 1:
        raise ParameterError("--max-caption-tokens", f"must be >= 1 (got {max_caption_tokens})")
    if (image is None) != (caption is None):
        raise ParameterError("--image/--caption", "give both (the opening image and its caption) or neither")
    if image is None and config.pretrained_weights:
        raise ParameterError("--image", "the paper preset needs an opening image and caption (--image, --caption)")
    opening = _read_image(Path(image)) if image is not None else None
    device = resolve_device(device)
    with build_directory(out, overwrite=overwrite) as folder:  # a non-empty --out is refused now, not at the end
        start = time.perf_counter()
        if config.pretrained_weights:
            from labkit.core.paths import weights_folder
            from labkit.models.paper_weights import encode_image, load_paper_models, paper_files

            paper_files(weights_folder())  # every missing file listed at once, before any loading
            models = load_paper_models(weights_folder(), device)
            model, tokenizer, detokenizer = models.mllm, models.tokenizer, models.detokenizer
            features, weights = encode_image(models.visual_tokenizer, opening), models.report
            source = str(image)
        else:
            model, tokenizer, detokenizer, caption, features, weights = _lab_models(config, opening, caption, progress)
            model, detokenizer = model.to(device), detokenizer.to(device)
            source = str(image) if image is not None else weights.pop("opening")
        loaded = time.perf_counter()
        cell = _resolve_sizes(cell, tokenizer, caption, model.num_queries, config.data.chunk_length, window, cap)
        run, images, seconds = _generate_and_draw(
            model, tokenizer, detokenizer, cell, caption, features, max_caption_tokens, fixed_caption_tokens, progress
        )
        record = {
            "preset": preset,
            "policy": policy,
            "params": {
                **cell.cache_params(),
                **({"recompute_segments": recompute_segments} if policy == "recompute-window" else {}),
            },
            "segments": segments,
            "opening": {"image": source, "caption": caption},
            "captions": run.captions,
            "steps": [
                {
                    "segment": s.segment + 1,
                    "kv_entries": s.kv_entries,
                    "kv_bytes": s.kv_bytes,
                    "seconds": round(s.seconds, 4),
                }
                for s in run.steps
            ],
            "tokens": len(run.token_ids),
            "detokenizer": {"steps": steps, "guidance_scale": guidance, "seed": seed, "size": list(images.shape[-2:])},
            "seconds": {"load": round(loaded - start, 2), **seconds},
            "images": [f"images/segment_{k + 1:02d}.png" for k in range(len(images))],
            "strip": "strip.png",
            "weights": weights,
        }
        _write_story(folder, record, images)
    return record


def _read_image(path: Path):
    """uint8 [3, H, W] of an image file; a missing or unreadable file is the user's to fix."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ParameterError("--image", f"{path}: not found")
    try:
        with Image.open(path) as picture:
            return torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as error:
        raise ParameterError("--image", f"{path}: cannot read an image ({error})") from None


def _lab_models(config, opening, caption: str | None, progress: bool):
    """tiny/small: the trained MLLM, the de-tokenizer `labkit detokenize` uses, and the opening's ViT features
    (from `--image`, else the first test story's first frame and caption)."""
    from labkit.cli.detokenize import load_detokenizer
    from labkit.core.artifacts import require
    from labkit.core.paths import portable_path
    from labkit.training.stage0 import extract_features, load_stage0_tokenizer
    from labkit.training.stage2 import NAME, load_mllm

    folder = require(NAME, config.name)
    model, tokenizer, _ = load_mllm(folder, config)
    detokenizer = load_detokenizer(config)
    weights = {"mllm": portable_path(folder)}
    if opening is None:
        from labkit.data.frames import load_frames
        from labkit.data.storystream_mini import ensure_dataset

        frames = load_frames(ensure_dataset(config, progress), "test")
        opening, caption = frames.images[0, 0], frames.captions[0][0]
        weights["opening"] = f"test story {frames.story_ids[0]}, frame 1"
    features = extract_features(load_stage0_tokenizer(config), opening.unsqueeze(0))[0]
    return model, tokenizer, detokenizer, caption, features, weights


def _resolve_sizes(cell, tokenizer, caption: str, queries: int, chunk_length: int, window, cap):
    """The training-length window (10 segments like the opening one: `[INST]`, caption, `<img>`, Q slots, `</img>`)
    and mm-sink's cap (window + sink + the zones of `window_images` evicted images), when not given."""
    from dataclasses import replace

    from labkit.caches.params import parse_params

    segment = len(tokenizer.inst_ids) + len(tokenizer.encode(caption)) + queries + 2
    window = window or chunk_length * segment
    layout = {"num_image_tokens": queries, "boi_id": tokenizer.boi_id, "eoi_id": tokenizer.eoi_id}
    zones = parse_params("mm-sink-as-coded", layout).image_group  # 24 entries per evicted image at Q = 64
    cell = replace(cell, window=window, cap=cap or window + cell.sink + cell.window_images * zones)
    cell.check()
    return cell


def _generate_and_draw(model, tokenizer, detokenizer, cell, caption, features, max_tokens, fixed, progress):
    """The story (`generate_story`) and its images [segments, 3, H, W]; bf16 weights run under autocast."""
    import contextlib

    import torch

    from labkit.experiments.story_ablation import draw_images
    from labkit.inference.generate import generate_story

    weight = next(model.parameters())
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if weight.is_cuda and weight.dtype == torch.bfloat16
        else contextlib.nullcontext()
    )
    with autocast:
        start = time.perf_counter()
        run = generate_story(
            model,
            tokenizer,
            caption,
            features.to(weight.device),
            segments=cell.segments,
            policy=cell.policy,
            params=cell.cache_params(),
            recompute_segments=cell.recompute_segments,
            max_caption_tokens=max_tokens,
            fixed_caption_tokens=fixed,
        )
        written = time.perf_counter()
        images = draw_images(detokenizer, [run], cell, progress)[0]
    return run, images, {"generate": round(written - start, 2), "draw": round(time.perf_counter() - written, 2)}


def _write_story(folder: Path, record: dict, images) -> None:
    from PIL import Image

    from labkit.experiments.story_ablation import strip_image

    (folder / "images").mkdir()
    for name, picture in zip(record["images"], images):
        Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(folder / name)
    strip = strip_image(images.unsqueeze(0), rows=1)
    Image.fromarray(strip.permute(1, 2, 0).contiguous().numpy()).save(folder / record["strip"])
    (folder / "story.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
