"""`labkit report`: run the lab's notebooks with papermill and write `reports/<preset>/`.

What exists of the pipeline runs; each notebook gets the preset's parameters. Outputs::

    reports/<preset>/executed/<notebook>.ipynb   executed notebooks (not committed when large)
    reports/<preset>/html/<notebook>.html        HTML exports
    reports/<preset>/summary.json                preset, git commit, packages, wall time, runs
    reports/<preset>/index.md, index.html        what ran, with links
"""

from __future__ import annotations

import html
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import write_text
from .doctor import package_versions
from .errors import LabError
from .presets import get_preset


def project_root() -> Path:
    """The checkout this package lives in (the folder with pyproject.toml)."""
    return Path(__file__).resolve().parent.parent


def artifacts_folder(preset: str) -> Path:
    """Where generated data and trained stages go (git-ignored): artifacts/<preset>/."""
    return project_root() / "artifacts" / preset


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class NotebookRun:
    notebook: str
    parameters: dict
    title: str
    outputs: dict = field(default_factory=dict)


def ensure_dataset(preset: str, progress: bool = True) -> Path:
    """The preset's StoryStream-mini data set, made once under artifacts/<preset>/ (about a minute at tiny)."""
    from .data.storystream_mini import MakeConfig, make_dataset

    folder = artifacts_folder(preset) / "storystream-mini"
    if not (folder / "dataset.json").is_file():
        data = get_preset(preset).data
        config = MakeConfig(train_stories=data.train_stories, val_stories=data.val_stories, test_stories=data.test_stories,
                            frames=data.frames, size=data.image_size, seed=0, bpe_merges=data.bpe_merges, image_tokens=data.image_tokens)
        make_dataset(folder, config, overwrite=True, progress=progress)
    return folder


def planned_runs(preset: str, progress: bool) -> list[NotebookRun]:
    """The notebooks this report runs, with their parameters; grows as the pipeline's stages land."""
    data = str(ensure_dataset(preset, progress))
    return [
        NotebookRun("01_storystream_data.ipynb", {"data_dir": data, "preset": preset}, "The StoryStream data and the story world"),
        NotebookRun("02_visual_tokenizer.ipynb", {"data_dir": data, "preset": preset, "train_live": False},
                    "Stage 0: the visual tokenizer and the judges (reference checkpoints)"),
        NotebookRun("03_stage1_detokenizer.ipynb", {"data_dir": data, "preset": preset, "train_live": False},
                    "Stage 1: the VAE and the de-tokenizer (reference checkpoints): reconstructions from features"),
        NotebookRun("04_stage2_mllm.ipynb", {"data_dir": data, "preset": preset, "train_live": False},
                    "Stage 2: the MLLM (reference checkpoint): losses, captions, regressed features"),
        NotebookRun("05_attention_sinks.ipynb", {"preset": preset, "trace_segments": 25, "long_context_stories": 4,
                                                 "stress_stories": 2},
                    "KV-cache policies, the RoPE clock, long-context curves (30 and 100 segments), attention sinks"),
        NotebookRun("06_stage3_adaptation.ipynb", {"data_dir": data, "preset": preset, "train_live": False},
                    "Stage 3: adapting the de-tokenizer to regressed features, official vs full (the paper's Table 4)"),
    ]


def _execute(run: NotebookRun, out: Path) -> float:
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    source = project_root() / "notebooks" / run.notebook
    if not source.is_file():
        raise LabError(f"{source}: notebook not found")
    executed = out / "executed" / run.notebook
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_suffix(".partial.ipynb")
    start = time.perf_counter()
    papermill.execute_notebook(str(source), str(partial), parameters=run.parameters, cwd=str(source.parent),
                               progress_bar=False, kernel_name="python3")
    seconds = time.perf_counter() - start
    partial.replace(executed)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    write_text(out / "html" / run.notebook.replace(".ipynb", ".html"), body)
    return seconds


def _index_markdown(summary: dict) -> str:
    lines = [f"# SEED-Story Lab report: preset `{summary['preset']}`", "",
             f"Commit `{summary['git_commit']}`; wall time {summary['wall_seconds']:.0f} s on {summary['device']}.", "",
             "| notebook | what it shows | seconds | executed | HTML |", "|---|---|---|---|---|"]
    for run in summary["runs"]:
        name = run["notebook"]
        lines.append(f"| `{name}` | {run['title']} | {run['seconds']:.1f} | [ipynb](executed/{name}) | "
                     f"[html](html/{name.replace('.ipynb', '.html')}) |")
    lines += ["", "Only the stages that exist so far are in this report (the de-tokenizer, the long-story ablation "
              "and the paper-table comparison come with later issues); nothing here is estimated or copied from the paper.", ""]
    return "\n".join(lines)


def _index_html(markdown: str, summary: dict) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(r['notebook'])}</code></td><td>{html.escape(r['title'])}</td><td>{r['seconds']:.1f}</td>"
        f"<td><a href='executed/{r['notebook']}'>ipynb</a></td><td><a href='html/{r['notebook'].replace('.ipynb', '.html')}'>html</a></td></tr>"
        for r in summary["runs"])
    return (f"<!doctype html><meta charset='utf-8'><title>SEED-Story Lab report ({summary['preset']})</title>"
            f"<h1>SEED-Story Lab report: preset {html.escape(summary['preset'])}</h1>"
            f"<p>Commit <code>{summary['git_commit']}</code>; wall time {summary['wall_seconds']:.0f} s on {summary['device']}.</p>"
            f"<table border=1 cellpadding=4><tr><th>notebook</th><th>what it shows</th><th>seconds</th><th>executed</th><th>HTML</th></tr>{rows}</table>")


def portable_path(path: Path | str) -> str:
    """A path inside the checkout written relative to it, so committed records name no machine's folders."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(project_root())) if project_root() in resolved.parents else str(path)


def _portable(parameters: dict) -> dict:
    return {k: portable_path(v) if isinstance(v, str) and v.startswith("/") else v for k, v in parameters.items()}


def run_report(preset: str = "tiny", out: Path | None = None, progress: bool = True) -> Path:
    """Run every planned notebook and write the report folder; returns the path of index.md."""
    import torch

    get_preset(preset)  # fail fast on an unknown preset, before any work
    out = out or project_root() / "reports" / preset
    start = time.perf_counter()
    runs = planned_runs(preset, progress)
    results = []
    for run in tqdm(runs, desc="report", unit="notebook", disable=not progress):
        seconds = _execute(run, out)
        results.append({"notebook": run.notebook, "title": run.title, "parameters": _portable(run.parameters), "seconds": round(seconds, 2)})
    summary = {"preset": preset, "git_commit": git_commit(), "packages": package_versions(),
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "wall_seconds": round(time.perf_counter() - start, 2), "runs": results}
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    markdown = _index_markdown(summary)
    write_text(out / "index.md", markdown)
    write_text(out / "index.html", _index_html(markdown, summary))
    return out / "index.md"
