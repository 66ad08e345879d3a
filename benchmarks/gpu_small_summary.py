"""The summary `benchmarks/gpu_small_pipeline.sh` writes: per retrained stage its wall seconds, steps/s, tokens/s
and peak GPU memory (each stage's `throughput.json`, written by `labkit.training.loop.train` beside its
checkpoints), the report's runs and the whole wall time.

    python benchmarks/gpu_small_summary.py --preset small --schedule quick --wall-seconds 512 --out summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from labkit.core.artifacts import ARTIFACTS  # noqa: E402
from labkit.core.atomic import write_text  # noqa: E402
from labkit.core.paths import artifacts_folder, project_root  # noqa: E402
from labkit.training.loop import THROUGHPUT  # noqa: E402


def read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def stage_rows(folder: Path) -> dict[str, dict]:
    seconds = read(folder / "retrain_seconds.json") or {}
    rows = {}
    for name in ARTIFACTS:
        throughput = read(folder / f".{name}.run" / THROUGHPUT) or {}
        manifest = read(folder / name / "manifest.json") or {}
        rows[name] = {
            "finished": bool(manifest),
            "wall_seconds": seconds.get(name),
            **{k: throughput.get(k) for k in ("device", "mixed_precision", "steps", "batch_size", "seconds")},
            **{k: throughput.get(k) for k in ("steps_per_second", "tokens_per_second", "peak_memory_gib")},
        }
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--schedule", default="quick")
    parser.add_argument("--wall-seconds", type=float, required=True)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--steps", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = artifacts_folder(args.preset) / f"retrained-{args.schedule}"
    report = read(project_root() / "reports" / f"{args.preset}-retrained-{args.schedule}" / "summary.json") or {}
    runs = report.get("runs", [])
    summary = {
        "check": f"the {args.preset} preset end to end: every stage retrained ({args.schedule} schedules, steps "
        f"{args.steps or 'as scheduled'}), the grid and notebook 08",
        "exit_code": args.exit_code,
        "wall_seconds": args.wall_seconds,
        "target_seconds": 540,
        "stages": stage_rows(folder),
        "report": {
            "device": report.get("device"),
            "notebook_seconds": report.get("notebook_seconds"),
            "runs": len(runs),
            "failed": [r["run"] for r in runs if r.get("status") == "failed"],
        },
        "packages": report.get("packages"),
    }
    write_text(Path(args.out), json.dumps(summary, indent=1) + "\n")
    print(f"wall {args.wall_seconds / 60:.1f} min (target 9), exit {args.exit_code}")
    print("| stage | wall s | steps | steps/s | tokens/s | peak GiB |\n|---|---|---|---|---|---|")
    for name, row in summary["stages"].items():
        print(
            f"| {name} | {row['wall_seconds']} | {row['steps']} | {row['steps_per_second']} | "
            f"{row['tokens_per_second']} | {row['peak_memory_gib']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
