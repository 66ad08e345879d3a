"""The `labkit` command line.

User mistakes (a bad file, a bad parameter) print one clear message and exit with code 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from labkit.core.errors import LabError


def _doctor(args: argparse.Namespace) -> int:
    from labkit.cli import doctor

    info = doctor.report()
    print(json.dumps(info, indent=2) if args.json else doctor.format_report(info))
    return 0


def _data_make(args: argparse.Namespace) -> int:
    from labkit.core.presets import get_preset
    from labkit.data.storystream_mini import MakeConfig, make_dataset

    preset = get_preset(args.preset).data
    train = preset.train_stories if args.stories is None else args.stories
    # Held-out splits default to 15% of the training stories (at least 1), as the tiny preset's 160/24/24.
    held_out = preset.val_stories if args.stories is None else max(1, math.ceil(0.15 * train))
    config = MakeConfig(
        train_stories=train,
        val_stories=held_out if args.val_stories is None else args.val_stories,
        test_stories=held_out if args.test_stories is None else args.test_stories,
        frames=preset.frames if args.frames is None else args.frames,
        size=preset.image_size if args.size is None else args.size,
        seed=args.seed,
        bpe_merges=preset.bpe_merges,
        image_tokens=preset.image_tokens,
    )
    make_dataset(args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    print(
        f"wrote {args.out}: {config.train_stories}/{config.val_stories}/{config.test_stories} stories "
        f"(train/val/test) x {config.frames} frames at {config.size} px, seed {config.seed}"
    )
    return 0


def _jsonl_files(path: Path) -> list[Path]:
    """A data set folder means its split files; a file means itself."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if not p.name.endswith(".annotations.jsonl"))
        if not files:
            raise LabError(f"{path}: folder holds no .jsonl story files")
        return files
    return [path]


def _data_validate(args: argparse.Namespace) -> int:
    from labkit.core.errors import DataError
    from labkit.data.storystream import validate

    problems = []
    for file in _jsonl_files(Path(args.path)):
        report = validate(file, image_root=args.image_root, check_images=not args.no_images)
        problems += report.problems
        if report.ok:
            print(
                f"{file}: ok ({report.stories} stories, {report.frames} frames, {report.images_checked} images checked)"
            )
    if problems:
        raise DataError(problems)
    return 0


def _data_chunk(args: argparse.Namespace) -> int:
    from labkit.data.storystream import chunk_file

    count = chunk_file(args.source, args.destination, args.length)
    print(f"wrote {args.destination}: {count} chunks of {args.length} frames")
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from labkit.viz.plots import save_story_strip

    out = save_story_strip(Path(args.path), args.story, args.out, image_root=args.image_root)
    print(f"saved {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from labkit.core.devices import choose_for_children
    from labkit.core.paths import artifacts_folder, project_root
    from labkit.core.presets import get_preset
    from labkit.report.executors import ExecutorConfig
    from labkit.report.grid import default_grid, load_grid

    get_preset(args.preset)
    load_grid(Path(args.grid) if args.grid else default_grid(args.preset))  # a bad grid stops here, in a second
    executor = ExecutorConfig(args.executor, args.scheduler).check()  # --scheduler without dask, dask missing
    if args.workers is not None and args.workers < 1:
        raise LabError(f"parameter --workers: must be >= 1 (got {args.workers})")
    choose_for_children(args.device, args.precision)  # kernels and retrained stages read it from the environment
    from labkit.report.run import run_report  # torch, transformers, diffusers: seconds to import

    out = Path(args.out) if args.out else None
    if args.retrain:
        from labkit.report.retrain import parse_steps, retrain_all

        # the retrained report goes beside the committed one, never over it, so the two can be compared
        out = out or project_root() / "reports" / f"{args.preset}-retrained-{args.retrain_schedule}"
        retrained_folder = artifacts_folder(args.preset) / f"retrained-{args.retrain_schedule}"
        seconds = retrain_all(
            args.preset,
            retrained_folder,
            progress=not args.quiet,
            schedule=args.retrain_schedule,
            full_study=args.retrain_full_study,
            stages=args.retrain_stages.split(",") if args.retrain_stages else None,
            steps=parse_steps(args.retrain_steps),
        )
        print(
            f"retrained {args.retrain_stages or 'every stage'} ({args.retrain_schedule} schedules) in "
            f"{seconds['total'] / 60:.1f} min wall: {seconds}"
        )
    index, failed = run_report(
        preset=args.preset,
        out=out,
        grid=Path(args.grid) if args.grid else None,
        progress=not args.quiet,
        course=not args.grid_only,
        data_root=args.data,
        rerun=args.rerun or args.retrain,
        workers=args.workers,
        executor=executor,
    )
    print(f"report: {index}")
    if args.retrain and (project_root() / "reports" / args.preset / "summary.json").is_file():
        from labkit.report.retrain import write_comparison

        comparison = write_comparison(args.preset, index.parent, retrained_folder)
        same = [stage for stage, identical in comparison["identical_weights"].items() if identical]
        print(f"weights byte-for-byte the committed ones: {', '.join(same) or 'none'}")
        for stage, values in comparison["checkpoints"].items():
            print(
                f"checkpoint {stage}: committed -> retrained "
                + ", ".join(f"{k} {a:.3f}->{b:.3f}" for k, (a, b) in values.items())
            )
        for run, deltas in comparison["cells"].items():
            print(f"{run}: retrained - committed " + ", ".join(f"{k} {v:+.3f}" for k, v in deltas.items()))
        outside = comparison["outside_tolerance"]
        print(
            "no grid cell in common with the committed report: no cell metric compared"
            if not comparison["cells"]
            else "every metric within labkit.report.retrain.TOLERANCE of the committed report"
            if not outside
            else "outside labkit.report.retrain.TOLERANCE:\n  " + "\n  ".join(outside)
        )
        print(f"comparison: {index.parent / 'comparison.json'}")
    for run in failed:
        print(f"FAILED {run['run']}: {run['error']} (partial notebook: {run.get('partial')})", file=sys.stderr)
    return 1 if failed else 0


def _train(args: argparse.Namespace) -> int:
    from labkit.core.artifacts import ARTIFACTS
    from labkit.core.devices import choose_for_children
    from labkit.core.presets import get_preset
    from labkit.training.common import StageRun
    from labkit.training.registry import require_needs

    preset = get_preset(args.preset)  # resolved once, here at the edge
    choose_for_children(args.device, args.precision)  # a bad --device stops here, before any work
    command = args.stage + (f" --mode {args.mode}" if args.stage == "stage3" else "")
    built = {name for name, kind in ARTIFACTS.items() if kind.train == command}
    if not preset.pretrained_weights:  # what this stage's trainers read must exist before any training starts
        require_needs(built, preset)
    run = StageRun(
        preset,
        args.schedule,
        steps=args.steps,
        data_root=args.data,
        out=args.out,
        resume=args.resume,
        progress=not args.quiet,
        device=args.device,
        precision=args.precision,
    )
    if args.stage == "stage0":
        from labkit.training.stage0 import train_judges, train_stage0

        for name, train in (("visual tokenizer", train_stage0), ("judges", train_judges)):
            manifest = train(run)
            print(f"stage 0 {name}: {json.dumps(manifest.get('metrics', {}))}")
    elif args.stage == "stage1":
        from labkit.training.stage1 import SCHEDULES, VAE, VAE_SCHEDULES, train_stage1, train_vae

        run.plan(SCHEDULES), run.plan(VAE_SCHEDULES, args.vae_steps)  # bad parameters are refused before any training
        vae_folder = StageRun(preset, args.schedule).folders(VAE)[0]
        if not (vae_folder / "manifest.json").is_file():
            manifest = train_vae(
                StageRun(
                    preset,
                    args.schedule,
                    steps=args.vae_steps,
                    data_root=args.data,
                    resume=args.resume,
                    progress=not args.quiet,
                    device=args.device,
                    precision=args.precision,
                )
            )
            print(f"stage 1a VAE: {json.dumps(manifest['metrics'])}")
        manifest = train_stage1(run, vae_folder=vae_folder)
        print(f"stage 1 de-tokenizer: {json.dumps(manifest['metrics'])}")
    elif args.stage == "lm":
        from labkit.training.lm import train_lm

        share = {} if args.backcopy_share is None else {"backcopy_share": args.backcopy_share}
        manifest = train_lm(run, **share)
        print(f"LM pre-training: {json.dumps(manifest['metrics'])}")
    elif args.stage == "stage3":
        from labkit.training.stage3 import train_stage3

        manifest = train_stage3(run, mode=args.mode)
        print(f"stage 3 ({args.mode}): {json.dumps(manifest['metrics'])}")
    else:
        from labkit.training.stage2 import train_stage2

        manifest = train_stage2(run, sampler=args.sampler)
        print(f"stage 2: {json.dumps(manifest['metrics'])}")
    return 0


def _detokenize(args: argparse.Namespace) -> int:
    from labkit.cli.detokenize import detokenize_file

    out = detokenize_file(
        args.features,
        args.out,
        preset=args.preset,
        folder=args.detokenizer,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _story(args: argparse.Namespace) -> int:
    from labkit.cli.story import run_story

    return run_story(args)


def _info(args: argparse.Namespace) -> int:
    from labkit.cli.info import format_info, model_info

    info = model_info(args.preset)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from labkit.experiments.bench import batch_ratio, generation_ratios, stage2_step_ratio

    if args.name == "batch":
        print(json.dumps(batch_ratio(repeats=args.repeats or 1), indent=2))
    elif args.name == "generation":
        print(json.dumps(generation_ratios(segments=args.segments), indent=2))
    else:
        print(
            json.dumps(stage2_step_ratio(args.preset, batch_size=args.batch_size, repeats=args.repeats or 15), indent=2)
        )
    return 0


def _trace_cache(args: argparse.Namespace) -> int:
    from labkit.experiments.cache_trace import policy_params, trace_cache, write_trace

    if (args.model is None) == (not args.random):
        raise LabError(
            "parameter --model/--random: give exactly one "
            "(a stage-2 artifact folder, or --random for a random tiny model)"
        )
    params = policy_params(args.policy, args.window, args.sink, args.cap, args.window_images)
    trace = trace_cache(
        args.policy,
        args.segments,
        args.model,
        params,
        caption_tokens=args.caption_tokens,
        recompute_segments=args.recompute_segments,
    )
    write_trace(trace, args.json)
    last = trace["steps"][-1]
    print(
        f"wrote {args.json}: {len(trace['steps'])} segments, {len(trace['token_ids'])} tokens; "
        f"after the last segment the cache holds {len(last['kept_positions'])} entries, {last['kv_bytes']:,} bytes"
    )
    return 0


def _stream_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labkit.core.atomic import write_text
    from labkit.inference.stream_eval import load_causal_lm, stream_eval

    if args.tokens < 2 or args.window < 1 or args.sink < 0:
        raise LabError("parameter --tokens/--window/--sink: need tokens >= 2, window >= 1, sink >= 0")
    model, tokenizer = load_causal_lm(args.model)
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise LabError(f"{path}: text file not found")
        if tokenizer is None:
            raise LabError(f"{args.model}: has no tokenizer files to encode --text with")
        ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"][: args.tokens]
    else:  # no text given: a reproducible token stream (meaningful only for random-model smoke runs)
        import torch

        ids = torch.randint(
            0, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)
        ).tolist()
    result = stream_eval(model, ids, tuple(args.policies.split(",")), args.window, args.sink, progress=not args.quiet)
    write_text(args.json, json.dumps(result) + "\n")
    for policy, curve in result["curves"].items():
        print(
            f"{policy:<7} final running perplexity {curve['running_ppl'][-1]:.2f}, KV {curve['kv_bytes'][-1]:,} bytes"
        )
    return 0


def _sink_check(args: argparse.Namespace) -> int:
    from labkit.cli.sink_check import format_sink_check, sink_check

    if args.stories < 1:
        raise LabError(f"parameter --stories: must be >= 1 (got {args.stories})")
    print(format_sink_check(sink_check(args.preset, args.stories, args.out, progress=not args.quiet)))
    return 0


def _sink_study(args: argparse.Namespace) -> int:
    from labkit.core.atomic import write_text
    from labkit.experiments.sink_emergence import SETTINGS, EmergenceConfig, run_study

    if args.steps < 1:
        raise LabError(f"parameter --steps: must be >= 1 (got {args.steps})")
    settings = tuple(args.settings.split(","))
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise LabError(f"parameter --settings: unknown {unknown}; choose from {list(SETTINGS)}")
    if args.batch_size < 1:
        raise LabError(f"parameter --batch-size: must be >= 1 (got {args.batch_size})")
    if args.lr <= 0 or args.weight_decay < 0:
        raise LabError(f"parameters --lr / --weight-decay: must be > 0 / >= 0 (got {args.lr} / {args.weight_decay})")
    config = EmergenceConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        every=max(1, args.steps // 8),
    )
    results = run_study(config, data_root=args.data, settings=settings, progress=not args.quiet)
    out = Path(args.out)
    if set(settings) != set(SETTINGS) and out.exists():  # a partial re-run replaces only its settings
        previous = json.loads(out.read_text(encoding="utf-8"))
        previous.setdefault("settings", {}).update(results["settings"])
        results = {**results, "settings": previous["settings"]}
    write_text(out, json.dumps(results, indent=1) + "\n")
    for setting in settings:  # the settings this run trained (others kept in --out are not re-printed)
        result = results["settings"][setting]
        print(
            f"{setting:<11} max BOS sink {result['max_bos_ratio']:.1f}x uniform (strongest head "
            f"{result['max_bos_ratio_head']:.1f}x); NLL dense/window/sink "
            + "/".join(f"{v:.3f}" for v in result["window_vs_sink_nll"].values())
        )
    return 0


def _device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        help="auto (default: CUDA when torch sees a GPU, else the CPU), cpu or cuda; "
        "CUDA_VISIBLE_DEVICES picks the GPU",
    )
    parser.add_argument(
        "--precision", help="auto (default: bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16 (labkit.core.devices)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit", description="SEED-Story Lab: reproduce, measure and teach SEED-Story."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    doctor = commands.add_parser("doctor", help="versions, device, threads and optional real weights")
    doctor.add_argument("--json", action="store_true", help="print as JSON")
    doctor.set_defaults(run=_doctor)

    data = commands.add_parser("data", help="StoryStream data: make, validate, chunk, show")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    make = data_commands.add_parser("make", help="make a StoryStream-mini data set")
    make.add_argument("--out", required=True, help="output folder (created atomically)")
    make.add_argument("--preset", default="tiny", help="tiny, small or paper: default sizes (default: tiny)")
    make.add_argument("--stories", type=int, help="training stories (val/test default to 15%% of it)")
    make.add_argument("--val-stories", type=int)
    make.add_argument("--test-stories", type=int)
    make.add_argument("--frames", type=int, help="frames per story, 2..100 (default: 30)")
    make.add_argument("--size", type=int, help="image size in pixels (default: the preset's, 64 at tiny)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run=_data_make)

    validate = data_commands.add_parser("validate", help="check a jsonl file (or every split of a data set folder)")
    validate.add_argument("path")
    validate.add_argument(
        "--image-root", help="folder the image paths are relative to (default: images/ beside the file)"
    )
    validate.add_argument("--no-images", action="store_true", help="check the structure only")
    validate.set_defaults(run=_data_validate)

    chunk = data_commands.add_parser("chunk", help="cut stories into non-overlapping chunks (official chunk_data.py)")
    chunk.add_argument("source")
    chunk.add_argument("destination")
    chunk.add_argument("--length", type=int, default=10)
    chunk.set_defaults(run=_data_chunk)

    show = data_commands.add_parser("show", help="save a story strip PNG")
    show.add_argument("path", help="a data set folder or a jsonl file")
    show.add_argument("--story", required=True, help="story id")
    show.add_argument("--out", help="PNG path (default: story_<id>.png)")
    show.add_argument("--image-root")
    show.set_defaults(run=_data_show)

    train = commands.add_parser(
        "train",
        help="train a stage of SEED-Story (stage0: visual tokenizer + judges, lm: language-model pre-training, "
        "stage1: VAE + de-tokenizer, stage2: MLLM, stage3: de-tokenizer adaptation)",
    )
    train.add_argument("stage", choices=("stage0", "lm", "stage1", "stage2", "stage3"))
    train.add_argument("--preset", default="tiny")
    train.add_argument(
        "--schedule",
        default="quick",
        help="quick (minutes, what the notebooks run) or reference (the committed checkpoints)",
    )
    train.add_argument("--steps", type=int, help="override the schedule's number of steps")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument(
        "--sampler", default="random-length", help="stage 2 samples: random-length (official) or all-segments"
    )
    train.add_argument(
        "--backcopy-share",
        type=float,
        help="lm: share of Bigram-Backcopy rows in the pre-training corpus (default: the reference's)",
    )
    train.add_argument("--data", help="data set folder (default: the preset's, made when missing)")
    train.add_argument(
        "--out",
        help="artifact folder (default: checkpoints/<preset>/<name> for reference, else artifacts/)",
    )
    train.add_argument(
        "--mode",
        default="official",
        choices=("official", "full"),
        help="stage 3: official (resampler + UNet to_k/to_v, as released) or full (all of it, as the paper says)",
    )
    train.add_argument("--vae-steps", type=int, help="stage 1: override the VAE schedule's number of steps")
    _device_arguments(train)
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(run=_train)

    detok = commands.add_parser(
        "detokenize", help="features (.pt / .safetensors, [N, D] or [B, N, D]) -> a PNG, through a de-tokenizer"
    )
    detok.add_argument("--features", required=True)
    detok.add_argument("--out", required=True, help="PNG to write (several images side by side)")
    detok.add_argument("--preset", default="tiny")
    detok.add_argument(
        "--detokenizer",
        help="de-tokenizer folder (default: the stage-3 official one, else stage 1; "
        "paper: SDXL base + the released adapted de-tokenizer from the weights folder)",
    )
    detok.add_argument("--steps", type=int, default=10, help="Euler steps")
    detok.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance scale (blank-frame negative)"
    )
    detok.add_argument("--seed", type=int, default=42)
    detok.add_argument("--quiet", action="store_true")
    detok.set_defaults(run=_detokenize)

    from labkit.cli.story import add_story_arguments  # argparse only: no torch at --help

    story = commands.add_parser(
        "story", help="one long story under a KV-cache policy: story.json, images/, strip.png (paper: real weights)"
    )
    add_story_arguments(story)
    story.set_defaults(run=_story)

    info = commands.add_parser(
        "info", help="parameter counts per component (built on the meta device: no weights needed)"
    )
    info.add_argument("--preset", default="tiny")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    bench = commands.add_parser("bench", help="speed targets as ratios measured side by side (BENCHMARKS.md)")
    bench.add_argument("name", choices=("stage2-step", "generation", "batch"))
    bench.add_argument("--segments", type=int, default=100, help="generation: story length for the sink policies")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--batch-size", type=int, default=12)
    bench.add_argument("--repeats", type=int, help="timings per side (default: stage2-step 15, batch 1)")
    bench.set_defaults(run=_bench)

    trace = commands.add_parser("trace-cache", help="which story positions a KV-cache policy holds, segment by segment")
    trace.add_argument(
        "--policy",
        required=True,
        help="dense, window, sink, mm-sink, mm-sink-as-coded, recompute-window, or the controls mm-sink-stale "
        "and mm-sink-as-coded-rerotated",
    )
    trace.add_argument("--segments", type=int, default=25)
    trace.add_argument("--model", help="a stage-2 artifact folder (the model writes its own captions)")
    trace.add_argument("--random", action="store_true", help="a random tiny model with fixed-length captions")
    trace.add_argument("--json", required=True, help="output file")
    trace.add_argument("--window", type=int)
    trace.add_argument("--sink", type=int)
    trace.add_argument("--cap", type=int)
    trace.add_argument("--window-images", type=int)
    trace.add_argument("--caption-tokens", type=int, default=8, help="caption length with --random")
    trace.add_argument("--recompute-segments", type=int, default=8, help="segments re-encoded by recompute-window")
    trace.set_defaults(run=_trace_cache)

    stream = commands.add_parser(
        "stream-eval", help="attention_sinks-style perplexity/memory/latency curves on a local causal LM"
    )
    stream.add_argument("--model", required=True, help="a local Llama-family model folder (from_pretrained, offline)")
    stream.add_argument("--text", help="a UTF-8 text file to stream (default: random token ids, for smoke runs)")
    stream.add_argument("--tokens", type=int, default=2000)
    stream.add_argument("--window", type=int, default=1020)
    stream.add_argument("--sink", type=int, default=4)
    stream.add_argument("--policies", default="dense,window,sink")
    stream.add_argument("--json", required=True)
    stream.add_argument("--quiet", action="store_true")
    stream.set_defaults(run=_stream_eval)

    study = commands.add_parser(
        "sink-study", help="when does a BOS attention sink emerge? three data settings, same model"
    )
    study.add_argument("--steps", type=int, default=600)
    study.add_argument("--batch-size", type=int, default=8, help="sequences of 256 tokens per step")
    study.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (a lever Gu et al. report)")
    study.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (another lever)")
    study.add_argument(
        "--settings",
        default=",".join(("story", "story+copy", "backcopy")),
        help="comma-separated settings to (re-)run; others already in --out are kept",
    )
    study.add_argument("--data", help="data set folder (default: the tiny preset's)")
    study.add_argument("--out", default="checkpoints/tiny/sink_emergence.json")
    study.add_argument("--quiet", action="store_true")
    study.set_defaults(run=_sink_study)

    check = commands.add_parser("sink-check", help="the trained MLLM's BOS sink per layer and what evicting it costs")
    check.add_argument("--preset", default="tiny")
    check.add_argument("--stories", type=int, default=6, help="test stories (25 segments each)")
    check.add_argument("--out", help="also write the numbers to this JSON file")
    check.add_argument("--quiet", action="store_true")
    check.set_defaults(run=_sink_check)

    report = commands.add_parser("report", help="run the notebooks with papermill and write a report")
    report.add_argument("--preset", default="tiny")
    report.add_argument("--out", help="report folder (default: reports/<preset>)")
    report.add_argument("--grid", help="ablation grid YAML (default: grids/<preset>.yaml)")
    report.add_argument(
        "--rerun", action="store_true", help="execute every notebook, even those whose finished run matches"
    )
    report.add_argument("--grid-only", action="store_true", help="run only the grid's notebooks and 08 (not 00-06)")
    report.add_argument("--data", help="data set folder (default: the preset's, made on first use)")
    report.add_argument(
        "--executor",
        choices=("processes", "dask"),
        default="processes",
        help="where the notebooks run: spawned processes here, or dask.distributed (docs/distributed_report.md)",
    )
    report.add_argument(
        "--workers", type=int, help="notebooks at once (default 2, at most the cores; with --scheduler: its threads)"
    )
    report.add_argument(
        "--scheduler", metavar="ADDRESS", help="with --executor dask: a running cluster's scheduler (tcp://host:8786)"
    )
    report.add_argument(
        "--retrain-schedule",
        choices=("reference", "quick"),
        default="reference",
        help="with --retrain: quick retrains the whole chain in minutes (a check, not the reference numbers)",
    )
    report.add_argument(
        "--retrain",
        action="store_true",
        help="first retrain every reference checkpoint from scratch into artifacts/<preset>/retrained-<schedule>",
    )
    report.add_argument(
        "--retrain-full-study",
        action="store_true",
        help="with --retrain: also the three sink-emergence runs in which no sink grows (~60 CPU min more)",
    )
    report.add_argument(
        "--retrain-stages",
        metavar="STAGE,...",
        help="with --retrain: retrain only these stages (e.g. lm,mllm,detokenizer_official,detokenizer_full); the "
        "others and the sink-emergence study are copied from the committed references",
    )
    report.add_argument(
        "--retrain-steps",
        metavar="STAGE=N,...",
        help="with --retrain: cut these stages' schedules to N steps (N alone: every stage); "
        "benchmarks/gpu_small_pipeline.sh sizes the small preset so",
    )
    _device_arguments(report)
    report.add_argument("--quiet", action="store_true")
    report.set_defaults(run=_report)

    course = commands.add_parser(
        "course", help="the course: student notebooks, answer key, exercise and runtime tables"
    )
    course_commands = course.add_subparsers(dest="course_command", required=True)
    course_build = course_commands.add_parser(
        "build", help="write course/student/*.ipynb and docs/course/{answer_key,exercises,runtimes,README}.md"
    )
    course_build.add_argument("--preset", default="tiny", help="the report whose measured runtimes the tables show")
    course_build.add_argument(
        "--check", action="store_true", help="write nothing; exit 2 naming every generated file that is out of date"
    )
    course_build.set_defaults(run=_course_build)
    return parser


def _course_build(args: argparse.Namespace) -> int:
    from labkit.core.paths import project_root
    from labkit.course import versions

    files = versions.build(preset=args.preset)
    root = project_root()
    if args.check:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            names = ", ".join(str(p.relative_to(root)) for p in stale)
            raise LabError(f"out of date (run `labkit course build`): {names}")
        print(f"course: {len(files)} generated files up to date")
        return 0
    changed = versions.write(files)
    print(
        f"course: {len(files)} generated files, {len(changed)} rewritten"
        + "".join(f"\n  {p.relative_to(root)}" for p in changed)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # transformers' own deprecation notices (about its internals) are noise for a user of this CLI
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LabError as error:
        print(f"labkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
