"""The course site (`make book`): the README, docs/, the course guide (docs/course/), the executed report notebooks
and the exercises' student notebooks as one static HTML site, built with Jupyter Book 1.x (Sphinx + myst-nb).

Sphinx executes nothing: the notebooks come executed, from `make report` (reports/<preset>/executed/, git-ignored)
or from `execute_notebooks` (`--execute`: each notebook once with its default parameters, live training off as in
the report, two at a time, into a folder of their own; what the browser test does on a fresh clone).
`--executed DIR` names the folder the build reads. The sources are staged into build/book/src in the layout they
have in the repository (README.md becomes index.md; the executed notebooks take the place of notebooks/*.ipynb, so
links to a notebook land on its executed page), then Sphinx writes build/book/html. Staging rewrites every
relative link of the Markdown (and of the notebooks' Markdown):

- a link to a page of the site (a staged .md or notebook, or a report's executed or HTML copy of one) stays a
  link to that page, its `#anchor` kept (headings get GitHub's ids, `myst_heading_anchors`);
- a link to any other file of the checkout (a screenshot, labkit/caches/policies.py, grids/tiny.yaml, a 07 run
  that is not on the site, a student notebook) becomes a download: the file is copied into the site;
- a link to a folder goes to its README when that is on the site, else is left as plain text (noted);
- a link to a report's executed notebook or HTML export that this checkout lacks (`make report` writes them, git
  ignores them: a fresh clone has none) is left as plain text (noted);
- a link to nothing is a problem: listed in `Site.problems` and printed (the test fails on any).

Widget outputs become a note (their JavaScript would come from a CDN), and the notebooks' widget state is
dropped. Staged files are only rewritten when their content changed, so a second build is incremental.

Usage: `python book/build_book.py [--preset tiny] [--out build/book] [--executed DIR | --execute]` (`make book`
runs `labkit course build` first, so the student notebooks are current, and `make report` when the executed
notebooks are missing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import posixpath
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
EXAMPLE_07 = "07_long_story_ablation-policy=mm-sink-segments=25-adaptation=full-seed=0"
REPORT_NOTEBOOKS = [
    "00_quickstart",
    "01_storystream_data",
    "02_visual_tokenizer",
    "03_stage1_detokenizer",
    "04_stage2_mllm",
    "05_attention_sinks",
    "06_stage3_adaptation",
    EXAMPLE_07,
    "08_report",
]
# `execute_notebooks`: longest first (seconds with EXECUTE_PARAMETERS, two at a time on a busy two-core machine),
# so that no long notebook starts while the other worker idles
EXECUTION_ORDER = [
    EXAMPLE_07,  # about 65 s
    "05_attention_sinks",  # 70
    "03_stage1_detokenizer",  # 65
    "08_report",  # 65
    "02_visual_tokenizer",  # 65
    "06_stage3_adaptation",  # 45
    "00_quickstart",  # 45
    "04_stage2_mllm",  # 30
    "01_storystream_data",  # 20
]
EXECUTE_WORKERS = 2
# What `execute_notebooks` passes besides the defaults: the stage notebooks' live training (`train_live`, on by
# default for a student) off, as in the report, so their pages show the reference checkpoints as the report's do.
# Live, the training and scoring took 06 and 03 about 12 and 9 minutes instead of about 1 (on a busy two-core
# machine). Every other parameter keeps its default (07's are the report's mm-sink cell of Table 2; 08 reads the
# committed report).
EXECUTE_PARAMETERS = {
    "02_visual_tokenizer": {"train_live": False},
    "03_stage1_detokenizer": {"train_live": False},
    "04_stage2_mllm": {"train_live": False},
    "06_stage3_adaptation": {"train_live": False},
}
# One thread per kernel: two two-thread torch kernels side by side thrash a two-core machine (and the report's
# notebooks run with one thread too, so the numbers match it).
THREAD_VARIABLES = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
COURSE_ORDER = ["README", "syllabus", "reading_group", "exercises", "answer_key", "runtimes", "instructor_notes"]
STUDENT = "course/student"
STUDENT_PAGE = "student_notebooks.md"
FILES = "_files"  # downloads are staged under src/_files/<path in the checkout> (excluded from the documents)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = (
    "*An interactive explorer (ipywidgets) is drawn here when the notebook runs: open it with `make lab`, or the"
    " explorers as an app with `make demo`.*"
)


@dataclass
class Site:
    """What a build made: the HTML folder, its pages (paths relative to it) and what went wrong."""

    html: Path
    notebook_pages: dict[str, str] = field(default_factory=dict)  # page (relative .html) -> executed notebook
    student_files: dict[str, Path] = field(default_factory=dict)  # name under course/student -> the file
    student_page: str = STUDENT_PAGE.replace(".md", ".html")
    problems: list[str] = field(default_factory=list)  # broken links found while staging
    warnings: list[str] = field(default_factory=list)  # Sphinx's warnings
    notes: list[str] = field(default_factory=list)  # links turned into plain text (folders off the site)
    seconds: float = 0.0

    @property
    def index(self) -> Path:
        return self.html / "index.html"


class MissingNotebooks(RuntimeError):
    pass


class ExecutionFailed(RuntimeError):
    pass


def executed_folder(preset: str = "tiny") -> Path:
    """Where `make report` writes the executed notebooks (the build's default)."""
    return ROOT / "reports" / preset / "executed"


def source_notebook(name: str) -> Path:
    """The notebook in notebooks/ that executed notebook `name` was run from (07_...-policy=... from 07_...)."""
    return ROOT / "notebooks" / f"{name.split('-')[0]}.ipynb"


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------------------------------------------- executing


def _digest(source: Path, parameters: dict) -> str | None:
    """The stamp digest `labkit report` writes next to an executed notebook (parameters, notebook text, thread
    count); None when labkit's report module no longer offers it."""
    try:
        from labkit.report.grid import GridRun
        from labkit.report.run import _run_digest
    except ImportError:
        return None
    return _run_digest(GridRun(source.name, parameters, ""), source)


def stale_notebooks(folder: Path | str, names: list[str] | None = None) -> list[str]:
    """The notebooks of `names` (default: the site's) that `folder` lacks or holds out of date: its stamp (the .json
    beside it, written by `labkit report` and by `execute_notebooks`) does not match the digest of the parameters
    it ran with (papermill records them in the notebook) and the current notebook in notebooks/. Without a digest
    to compare (no stamp, or labkit cannot make one) a notebook older than its source is stale."""
    folder = Path(folder)
    stale = []
    for name in names or REPORT_NOTEBOOKS:
        executed, source = folder / f"{name}.ipynb", source_notebook(name)
        if not executed.is_file() or not source.is_file():
            stale.append(name)
            continue
        try:
            stamp = json.loads(executed.with_suffix(".json").read_text(encoding="utf-8"))
            metadata = json.loads(executed.read_text(encoding="utf-8"))["metadata"]["papermill"]
            digest = _digest(source, metadata.get("parameters") or {})
        except (OSError, ValueError, KeyError, TypeError):
            stamp, digest = {}, None
        if digest is not None and stamp.get("digest") is not None:
            current = stamp["digest"] == digest
        else:
            current = executed.stat().st_mtime > source.stat().st_mtime
        if not current:
            stale.append(name)
    return stale


def _execute_one(name: str, out_dir: str, parameters: dict, digest: str | None) -> tuple[str, float, str | None]:
    """Run one notebook with papermill into out_dir/<name>.ipynb (in a worker process: it imports no torch); (name,
    seconds, error). `digest` goes into its stamp."""
    import papermill

    source = source_notebook(name)
    target = Path(out_dir) / f"{name}.ipynb"
    partial = Path(out_dir) / f"{name}.partial.ipynb"
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(partial),
            parameters=parameters,
            cwd=str(source.parent),
            kernel_name="python3",
            progress_bar=False,
        )
    except Exception as error:  # the partial notebook stays, for a look at the failing cell
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return name, time.perf_counter() - start, lines[-1] if lines else type(error).__name__
    seconds = time.perf_counter() - start
    partial.replace(target)
    stamp = {"digest": digest, "seconds": round(seconds, 2), "parameters": parameters}
    target.with_suffix(".json").write_text(json.dumps(stamp) + "\n", encoding="utf-8")
    return name, seconds, None


@contextlib.contextmanager
def _one_thread():
    """One thread: the variables the kernels read at start-up, and this process's torch; restored afterwards."""
    import torch

    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    threads = torch.get_num_threads()
    os.environ.update(THREAD_VARIABLES)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute_notebooks(
    out_dir: Path | str,
    preset: str = "tiny",
    names: list[str] | None = None,
    workers: int = EXECUTE_WORKERS,
    parameters: dict[str, dict] | None = None,
    echo=print,
) -> dict[str, float]:
    """Execute the site's notebooks (or `names`) with papermill into `out_dir`, under the report's file names, each
    with its default parameters but those of `parameters` ({name: {parameter: value}}, default EXECUTE_PARAMETERS:
    no live training; {}: the defaults alone); `preset` is passed only when it is not the notebooks' default, tiny.
    Kernel python3, working directory notebooks/, `workers` at a time in separate processes, one thread each,
    longest first. Each notebook gets a stamp as `labkit report` writes one. Returns {name: seconds}; raises
    ExecutionFailed naming every notebook that failed (after all have run)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(names) if names is not None else list(REPORT_NOTEBOOKS)
    todo = [name for name in EXECUTION_ORDER if name in wanted] + [n for n in wanted if n not in EXECUTION_ORDER]
    chosen = EXECUTE_PARAMETERS if parameters is None else parameters
    given = {name: {**chosen.get(name, {}), **({} if preset == "tiny" else {"preset": preset})} for name in todo}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    if not todo:
        return seconds
    with _one_thread():  # set before the pool starts: its workers, and the kernels they start, inherit it
        # the data set the notebooks share is made here, once, before two kernels could both start making it
        from labkit.core.presets import get_preset
        from labkit.data.storystream_mini import ensure_dataset

        ensure_dataset(get_preset(preset), progress=False)
        # spawned: this process may have imported torch, whose thread pools do not survive a fork; processes:
        # papermill chdir()s the whole process while a notebook runs
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
            # each stamp's digest is of the notebook's text as it starts (labkit, torch: imported here, once)
            digests = {name: _digest(source_notebook(name), given[name]) for name in todo}
            futures = [pool.submit(_execute_one, name, str(out), given[name], digests[name]) for name in todo]
            for done, future in enumerate(as_completed(futures), 1):
                name, took, error = future.result()
                seconds[name] = took
                if error:
                    failed.append(f"{name}.ipynb: {error} (the partial notebook: {out / name}.partial.ipynb)")
                echo(f"book: {'FAILED' if error else 'executed'} {name} in {took:.0f} s ({done}/{len(todo)})")
    if failed:
        raise ExecutionFailed(f"{len(failed)} notebook(s) failed to execute:\n" + "\n".join(failed))
    return seconds


# ---------------------------------------------------------------------------------------------------- staging


class Stager:
    """Copies the sources into `src`, rewriting their links (see the module docstring)."""

    def __init__(self, src: Path, preset: str):
        self.src = src
        self.preset = preset
        self.docs: dict[str, str] = {}  # path in the checkout -> staged document (both posix, relative)
        self.written: set[str] = set()  # staged paths written by this build (others are deleted)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.absent: dict[str, int] = {}  # checkout file -> links to report outputs this checkout lacks

    # --- writing

    def write(self, staged: str, content: bytes) -> None:
        target = self.src / staged
        self.written.add(staged)
        if target.is_file() and target.read_bytes() == content:
            return  # unchanged: Sphinx keeps its cached read of it
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    def copy(self, repo_path: str, staged: str) -> None:
        self.write(staged, (ROOT / repo_path).read_bytes())

    def remove_stale(self) -> None:
        """Delete what an earlier build staged and this one did not (a course page or student file removed)."""
        for path in sorted(self.src.rglob("*"), reverse=True):
            relative = path.relative_to(self.src).as_posix()
            if path.is_file() and relative not in self.written:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    def absent_notes(self) -> None:
        for base, count in self.absent.items():
            self.notes.append(
                f"{base}: {count} links to report outputs that this checkout lacks (`make report` writes them,"
                " git-ignored), left as plain text"
            )

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    # --- links

    def resolve(self, target: str, base: str, staged_doc: str, *, image: bool) -> str | None:
        """The rewritten destination of link `target` written in checkout file `base` (staged as `staged_doc`);
        None: drop the link, keep its text."""
        if not target or target.startswith("#") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            return target  # same-page anchor, or a URL with a scheme (http:, mailto:, path:, ...)
        path, _, anchor = target.partition("#")
        path = path.split("?")[0]
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(base), path))
        here = posixpath.dirname(staged_doc) or "."
        where = f"{base}: link `{target}`"
        if repo.startswith("../") or repo == "..":
            self._problem(f"{where} leaves the checkout")
            return None
        if not image:
            html = re.fullmatch(r"reports/([^/]+)/html/(.+)\.html", repo)
            if html:  # a report's HTML copy of a notebook: its executed page, else the executed notebook
                executed = f"reports/{html.group(1)}/executed/{html.group(2)}.ipynb"
                if executed in self.docs or (ROOT / executed).is_file():
                    repo = executed
            readme = posixpath.join(repo, "README.md") if repo != "." else "README.md"
            for page in (repo, readme):  # a page, or a folder whose README is a page
                if page in self.docs:
                    return posixpath.relpath(self.docs[page], here) + (f"#{anchor}" if anchor else "")
        full = ROOT / repo
        if not image and not full.exists() and re.match(r"reports/[^/]+/(executed|html)/", repo):
            self.absent[base] = self.absent.get(base, 0) + 1  # noted once per file, by `absent_notes`
            return None
        if full.is_file():
            staged = f"{FILES}/{repo}"
            self.copy(repo, staged)
            relative = posixpath.relpath(staged, here)
            return relative if image else f"path:{relative}"
        if full.is_dir() and not image:
            if f"{where}: a folder, left as plain text" not in self.notes:
                self.notes.append(f"{where}: a folder, left as plain text")
            return None
        self._problem(f"{where}: {repo} does not exist")
        return None

    def markdown(self, text: str, base: str, staged_doc: str) -> str:
        """`text` (Markdown from checkout file `base`) with its relative links rewritten; code left alone."""
        out: list[str] = []
        prose: list[str] = []
        fence: str | None = None
        for line in text.splitlines(keepends=True):
            marker = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
            if fence is not None:
                if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                    fence = None
                out.append(line)
            elif marker:
                out.append(self._prose("".join(prose), base, staged_doc))
                prose = []
                fence = marker.group(1)
                # GitHub draws Mermaid diagrams; here one is shown as its text (no CDN script, no unknown lexer)
                out.append(re.sub(r"(`{3,}|~{3,})\s*mermaid\s*$", r"\1text\n", line))
            else:
                prose.append(line)
        out.append(self._prose("".join(prose), base, staged_doc))
        return "".join(out)

    def _prose(self, text: str, base: str, staged_doc: str) -> str:
        """Rewrite the links of Markdown outside fenced code; code spans (which may sit inside a link's text)
        are masked meanwhile."""
        spans: list[str] = []

        def mask(match: re.Match) -> str:
            spans.append(match.group(0))
            return f"\x00{len(spans) - 1}\x00"

        masked = re.sub(r"(`+)(?:(?!\1).)+?\1", mask, text, flags=re.S)
        rewritten = self._links(masked, base, staged_doc)
        return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], rewritten)

    def _links(self, text: str, base: str, staged_doc: str) -> str:
        def inline(match: re.Match) -> str:
            bang, label, dest, title = match.group(1), match.group(2), match.group(3), match.group(4) or ""
            raw = dest[1:-1] if dest.startswith("<") else dest
            new = self.resolve(raw, base, staged_doc, image=bool(bang))
            if new is None:
                return label if not bang else f"*{label}*"
            new = f"<{new}>" if (" " in new or dest.startswith("<")) else new
            return f"{bang}[{label}]({new}{title})"

        def definition(match: re.Match) -> str:
            new = self.resolve(match.group(2), base, staged_doc, image=False)
            return f"{match.group(1)}{new}" if new is not None else ""

        def html_attribute(match: re.Match) -> str:
            new = self.resolve(match.group(3), base, staged_doc, image=match.group(1).lower() == "src")
            if new is not None and new.startswith("path:"):
                new = new[len("path:") :]  # raw HTML is not processed by Sphinx: link the staged copy
                self.notes.append(f"{base}: raw HTML link `{match.group(3)}` needs its file next to the page")
            return f"{match.group(1)}={match.group(2)}{new or '#'}{match.group(2)}"

        text = re.sub(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\((<[^>]*>|[^)\s]+)(\s+\"[^\"]*\")?\)", inline, text)
        text = re.sub(r"^(\s{0,3}\[[^\]]+\]:\s*)(\S+)", definition, text, flags=re.M)
        return re.sub(r"\b(src|href)=([\"'])([^\"']+)\2", html_attribute, text)

    # --- sources

    def stage_markdown(self, repo_path: str, staged: str, prefix: str = "") -> None:
        text = (ROOT / repo_path).read_text(encoding="utf-8")
        self.write(staged, (prefix + self.markdown(text, repo_path, staged)).encode("utf-8"))

    def stage_notebook(self, executed: Path, source: str, staged: str, intro: str | None = None) -> None:
        """An executed notebook, its Markdown's links rewritten as if it sat at `source` (notebooks/...)."""
        notebook = json.loads(executed.read_text(encoding="utf-8"))
        notebook.get("metadata", {}).pop("widgets", None)
        for cell in notebook["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                cell["source"] = self.markdown(text, source, staged)
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if WIDGET_MIME in data:
                    output["data"] = {"text/markdown": WIDGET_NOTE}
                elif "text/markdown" in data:
                    markdown = data["text/markdown"]
                    markdown = "".join(markdown) if isinstance(markdown, list) else markdown
                    data["text/markdown"] = self.markdown(markdown, source, staged)
        if intro:  # a paragraph under the notebook's title
            intro = self.markdown(intro, source, staged)
            first = next((c for c in notebook["cells"] if c["cell_type"] == "markdown"), None)
            if first is not None and re.match(r"#\s", first["source"]):
                title, _, rest = first["source"].partition("\n")
                first["source"] = f"{title}\n\n{intro}\n\n{rest.lstrip()}"
            else:
                notebook["cells"].insert(
                    0, {"cell_type": "markdown", "id": "book-intro", "metadata": {}, "source": intro}
                )
        self.write(staged, (json.dumps(notebook, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _course_files() -> list[str]:
    found = sorted(p.stem for p in (ROOT / "docs" / "course").glob("*.md"))
    return [name for name in COURSE_ORDER if name in found] + [name for name in found if name not in COURSE_ORDER]


def _student_files() -> dict[str, Path]:
    folder = ROOT / STUDENT
    if not folder.is_dir():
        return {}
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    files.sort(key=lambda p: (p.suffix != ".ipynb", p.relative_to(folder).as_posix()))
    return {p.relative_to(folder).as_posix(): p for p in files}


def _student_page(files: dict[str, Path]) -> str:
    lines = [
        "# Exercises: student notebooks",
        "",
        "The exercises' student versions, made from the course notebooks by `labkit course build` (which"
        " `make book` runs first): each solution is cut out (nbgrader), its check cell stays. Download one and open"
        " it in JupyterLab inside the checkout (`make lab`); the course guide says which session uses which.",
        "",
    ]
    if not files:
        lines.append(
            f"No student notebooks have been built yet (`{STUDENT}/` is empty or missing): run `labkit course build`."
        )
    for name in files:
        lines.append(f"- [{name}]({STUDENT}/{name})")
    return "\n".join(lines) + "\n"


def _toc(course: list[str], notebooks: list[tuple[str, str]], report: bool) -> str:
    def entry(file: str, title: str | None = None, indent: str = "  ") -> str:
        return f"{indent}- file: {file}" + (f'\n{indent}  title: "{title}"' if title else "")

    lines = ["format: jb-book", "root: index", "parts:", "- caption: Course", "  chapters:"]
    if "README" in course:
        lines.append(entry("docs/course/README"))
        others = [name for name in course if name != "README"]
        if others:
            lines.append("    sections:")
            lines += [entry(f"docs/course/{name}", indent="    ") for name in others]
    else:
        lines += [entry(f"docs/course/{name}") for name in course]
    lines.append(entry(STUDENT_PAGE.removesuffix(".md")))
    lines += ["- caption: The notebooks, executed", "  chapters:"]
    lines += [entry(staged.removesuffix(".ipynb"), title) for staged, title in notebooks]
    if report:
        lines += ["- caption: The report", "  chapters:", entry("report")]
    lines += [
        "- caption: How the code is built",
        "  chapters:",
        entry("docs/architecture"),
        entry("docs/paper_to_code"),
    ]
    return "\n".join(lines) + "\n"


def stage(
    src: Path, preset: str = "tiny", executed: Path | str | None = None
) -> tuple[Stager, dict[str, str], dict[str, Path]]:
    """Stage every source into `src`, the notebooks from folder `executed` (default reports/<preset>/executed); the
    stager, the notebook pages (staged .ipynb -> executed file) and the student files."""
    executed = Path(executed) if executed is not None else executed_folder(preset)
    missing = [name for name in REPORT_NOTEBOOKS if not (executed / f"{name}.ipynb").is_file()]
    if missing:
        raise MissingNotebooks(
            f"the site shows the executed notebooks, and {_shown(executed)}/ lacks "
            f"{', '.join(f'{name}.ipynb' for name in missing)}: run `make report` "
            f"(or `labkit report --preset {preset}`), or build with --execute"
        )
    src.mkdir(parents=True, exist_ok=True)
    stager = Stager(src, preset)
    course = _course_files()
    report = ROOT / "reports" / preset / "index.md"

    # every page of the site, by its path in the checkout (links to any of these land on the page)
    stager.docs["README.md"] = "index.md"
    for name in ("architecture", "paper_to_code"):
        stager.docs[f"docs/{name}.md"] = f"docs/{name}.md"
    for name in course:
        stager.docs[f"docs/course/{name}.md"] = f"docs/course/{name}.md"
    if report.is_file():
        stager.docs[f"reports/{preset}/index.md"] = "report.md"
    notebooks: list[tuple[str, str | None]] = []
    pages: dict[str, str] = {}
    for name in REPORT_NOTEBOOKS:
        template = name.split("-")[0]  # 07_long_story_ablation-policy=... was run from 07_long_story_ablation
        staged = f"notebooks/{template}.ipynb"
        stager.docs[f"reports/{preset}/executed/{name}.ipynb"] = staged
        stager.docs[f"notebooks/{template}.ipynb"] = staged
        title = "07 example run: mm-sink, 25 segments, full adaptation, seed 0" if name == EXAMPLE_07 else None
        notebooks.append((staged, title))
        pages[staged] = _shown(executed / f"{name}.ipynb")
    stager.docs[f"{STUDENT}/README.md"] = STUDENT_PAGE  # a link to course/student/ lands on the downloads page

    stager.stage_markdown("README.md", "index.md")
    for repo_path, staged in stager.docs.items():
        if repo_path.endswith(".md") and repo_path not in ("README.md", f"{STUDENT}/README.md"):
            stager.stage_markdown(repo_path, staged)
    for staged, executed_path in pages.items():
        intro = None
        if executed_path.endswith(f"{EXAMPLE_07}.ipynb"):
            intro = (
                "This page is one cell of the report's ablation grid (notebook 07's default parameters): policy"
                " `mm-sink`, 25 segments, the `full` adapted de-tokenizer, seed 0. Every other cell is listed in"
                f" [the report](../reports/{preset}/index.md#runs)."
            )
        stager.stage_notebook(ROOT / executed_path, staged, staged, intro)
    students = _student_files()
    stager.write(STUDENT_PAGE, stager.markdown(_student_page(students), "README.md", STUDENT_PAGE).encode())
    stager.write("_toc.yml", _toc(course, notebooks, report.is_file()).encode())
    stager.write("_config.yml", (BOOK / "_config.yml").read_bytes())
    stager.absent_notes()
    return stager, pages, students


# ---------------------------------------------------------------------------------------------------- building


class _Tee(io.TextIOBase):
    """Sphinx's warning stream: kept for Site.warnings and (unless quiet) echoed."""

    def __init__(self, echo):
        self.buffer_text = io.StringIO()
        self.echo = echo

    def write(self, text: str) -> int:
        self.buffer_text.write(text)
        if self.echo is not None:
            self.echo.write(text)
        return len(text)


def build(
    out: Path | str = ROOT / "build" / "book",
    preset: str = "tiny",
    quiet: bool = False,
    executed: Path | str | None = None,
) -> Site:
    """Stage the sources into `out`/src and build the site into `out`/html, its notebooks from folder `executed`
    (default reports/<preset>/executed); the Site (raises MissingNotebooks, or RuntimeError if Sphinx fails)."""
    from jupyter_book.sphinx import build_sphinx
    from sphinx.util.console import nocolor

    nocolor()

    start = time.perf_counter()
    out = Path(out)
    src, html = out / "src", out / "html"
    stager, pages, students = stage(src, preset, executed)
    stager.remove_stale()
    for line in stager.notes + stager.problems:
        print(f"book: {line}", file=sys.stderr)
    warnings = _Tee(None if quiet else sys.stderr)
    with contextlib.redirect_stderr(warnings), contextlib.redirect_stdout(io.StringIO() if quiet else sys.stdout):
        status = build_sphinx(
            src,
            html,
            path_config=str(src / "_config.yml"),
            confoverrides={"latex_individualpages": False},
            noconfig=True,
            doctreedir=out / "doctrees",
            jobs=1,  # sphinx_multitoc_numbering is not parallel-safe, and a build takes seconds
            quiet=quiet,
        )
    if status != 0:
        raise RuntimeError(f"Sphinx failed ({status!r}):\n{warnings.buffer_text.getvalue()[-4000:]}")
    text = warnings.buffer_text.getvalue()
    site = Site(
        html=html,
        notebook_pages={staged.replace(".ipynb", ".html"): executed for staged, executed in pages.items()},
        student_files=students,
        problems=stager.problems,
        warnings=[line for line in text.splitlines() if "WARNING" in line or "ERROR" in line],
        notes=stager.notes,
        seconds=time.perf_counter() - start,
    )
    return site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="whose executed report notebooks (reports/<preset>/executed)")
    parser.add_argument("--out", default=str(ROOT / "build" / "book"), help="src/ and html/ go here")
    parser.add_argument(
        "--executed", metavar="DIR", help="the folder of executed notebooks (default: reports/<preset>/executed)"
    )
    parser.add_argument(
        "--execute",
        action="store_true",
        help="first execute the notebooks with their defaults (minutes) into --executed (default: <out>/executed)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only problems and the summary")
    args = parser.parse_args(argv)
    executed = args.executed
    try:
        if args.execute:
            executed = executed or str(Path(args.out) / "executed")
            start = time.perf_counter()
            execute_notebooks(executed, args.preset)
            print(f"book: executed the notebooks into {executed} in {time.perf_counter() - start:.0f} s")
        site = build(args.out, args.preset, quiet=args.quiet, executed=executed)
    except (MissingNotebooks, ExecutionFailed) as error:
        print(f"book: {error}", file=sys.stderr)
        return 2
    print(
        f"book: {len(site.notebook_pages)} notebooks, {len(site.student_files)} student files, "
        f"{len(site.warnings)} Sphinx warnings, {len(site.problems)} broken links, {site.seconds:.0f} s: "
        f"{site.index}"
    )
    return 1 if site.problems else 0


if __name__ == "__main__":
    sys.exit(main())
