"""Stages 2 and 3 at a paper-*shaped* preset: the paper preset's training paths on small random weights.

`paper_shaped_preset` is the `paper` preset (LoRA r 16 on the seven projections, 64 image slots, Llama-2's
tokenizer layout + the release's 66 added tokens, weights read from `$LABKIT_WEIGHTS` in the official folder layout)
with a 2-layer, 64-wide Llama, the `tiny` preset's frames and visual-tokenizer sizes and SDXL's de-tokenizer layout
at 64 px (`official_layout.LayoutSizes().detokenizer`, what the stage-3 test writes), so a CPU runs it in seconds.
`python -m labkit.training.paper_shaped` calls `labkit.training.stage2.train_stage2`, the function
`labkit train stage2 --preset paper` calls: what the two-process launch tests here (two CPU processes, resume on
one) is the code the 8-GPU run executes.

    torchrun --standalone --nproc_per_node 2 -m labkit.training.paper_shaped --data D --out O --steps 4 \\
        --stop-after 2 --result result.json

(torchrun, not `accelerate launch --cpu --num_processes 2`, which starts one process without mpirun.)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from labkit.core.atomic import write_text
from labkit.core.errors import LabError
from labkit.core.paths import weights_folder
from labkit.core.presets import PRESETS, LLMPreset, Preset
from labkit.models.official_layout import LayoutSizes
from labkit.training.common import StageRun
from labkit.training.stage2 import train_stage2
from labkit.training.stage2_lora import LLAMA

SHAPED_LLM = dict(hidden_size=64, layers=2, heads=4, kv_heads=4, intermediate_size=172, max_positions=4096)


def paper_shaped_preset(base_vocab: int) -> Preset:
    """The paper preset with a small Llama (`SHAPED_LLM`, `base_vocab` tokens before the 66 added ones) and tiny's
    64 px frames and visual tokenizer, a 64 px SDXL-layout de-tokenizer; everything else (LoRA, slots, schedules,
    capabilities) is the paper's."""
    paper, tiny = PRESETS["paper"], PRESETS["tiny"]
    heads = SHAPED_LLM["heads"]
    return replace(
        paper,
        name="paper-shaped",
        data=tiny.data,
        visual_tokenizer=tiny.visual_tokenizer,
        detokenizer=LayoutSizes().detokenizer,
        mllm=replace(
            paper.mllm, llm=LLMPreset(**SHAPED_LLM, base_vocab=base_vocab), resampler_heads=heads, output_heads=heads
        ),
    )


def preset_from_weights() -> Preset:
    """`paper_shaped_preset` with the base vocabulary of the Llama in the weights folder."""
    path = weights_folder() / LLAMA / "config.json"
    if not path.is_file():
        raise LabError(f"{path}: not found (a paper-shaped run reads a small Llama in the official layout)")
    return paper_shaped_preset(json.loads(path.read_text(encoding="utf-8"))["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a labkit data set (StoryStream-mini layout)")
    parser.add_argument("--out", required=True, help="the MLLM artifact folder")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop-after", type=int, help="interrupt after this many steps (checkpoint written)")
    parser.add_argument("--result", help="the main process writes what train_stage2 returned here (JSON)")
    args = parser.parse_args(argv)
    try:
        preset = preset_from_weights()
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = StageRun(
        preset,
        steps=args.steps,
        data_root=Path(args.data),
        out=Path(args.out),
        progress=False,
        stop_after=args.stop_after,
    )
    try:
        result = train_stage2(run)
    except LabError as error:  # bad input: the message, exit code 2, no traceback (as the labkit command)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.result and PartialState().is_main_process:
        write_text(Path(args.result), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
