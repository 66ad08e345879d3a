#!/usr/bin/env bash
# The `small` preset end to end on one GPU (issue 16): the data set, every stage retrained from scratch with the
# quick schedules cut to the step counts below, the report grid (grids/small.yaml) and notebook 08; then each
# stage's steps/s, tokens/s and peak GPU memory and the whole wall time, in benchmarks/results/.
# Target: under 9 minutes on one H200 (the step counts are sized from the one small-preset GPU measurement so far,
# stage 2 at 6.37 steps/s, BENCHMARKS.md; adjust STEPS after the first run, the log gives each stage's time).
#
#   bash benchmarks/gpu_small_pipeline.sh            # from the repository root, with `make setup` done (or the
#                                                    # package installed: diffusers, peft, accelerate, papermill)
#   STEPS=mllm=100 bash benchmarks/gpu_small_pipeline.sh   # other step counts (STAGE=N,...; N alone: every stage)
#   PRESET=tiny DEVICE=cpu STEPS=2 GRID=my-grid.yaml RESULTS=/tmp/r bash benchmarks/gpu_small_pipeline.sh
#                     # the same path on the CPU at tiny with 2 steps a stage: a check of the script (at small, the
#                     # CPU needs hours: 2,200 stories of data and their features)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
GRID=${GRID:-grids/$PRESET.yaml}
RESULTS=${RESULTS:-benchmarks/results}
STEPS=${STEPS:-"visual_tokenizer=300,judges=300,lm=400,vae=300,detokenizer=600,mllm=600,detokenizer_official=200,detokenizer_full=200"}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_small_pipeline.log"
start=$(date +%s)
set +e
"$PYTHON" -m labkit.cli.main report --preset "$PRESET" --grid "$GRID" --retrain --retrain-schedule quick --retrain-steps "$STEPS" \
  --grid-only --device "$DEVICE" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
wall=$(( $(date +%s) - start ))
"$PYTHON" benchmarks/gpu_small_summary.py --preset "$PRESET" --schedule quick --wall-seconds "$wall" \
  --exit-code "$status" --steps "$STEPS" --out "$RESULTS/gpu_small_pipeline.json"
exit "$status"
