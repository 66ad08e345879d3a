"""The course site (`make book`): the README, docs/, the course guide (docs/course/), the executed report notebooks
and the exercises' student notebooks as one static HTML site, built with Jupyter Book 1.x (Sphinx + myst-nb).

Sphinx executes nothing: the notebooks come executed, from `make report` (reports/<preset>/executed/, git-ignored)
or from `execute_notebooks` (`--execute`, book/execute.py: each notebook once with its default parameters, live
training off as in the report, two at a time, into a folder of their own; what the browser test does on a fresh
clone). `--executed DIR` names the folder the build reads. The sources are staged into build/book/src, their
relative links rewritten (book/stage.py says how), then Sphinx writes build/book/html.

Usage: `python book/build_book.py [--preset tiny] [--out build/book] [--executed DIR | --execute]` (`make book`
runs `labkit course build` first, so the student notebooks are current, and `make report` when the executed
notebooks are missing).

This module is the build and its command line; the names of execute.py and stage.py that callers use (the browser
test among them) are re-exported, so `import build_book` (with book/ on sys.path) reaches them all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from execute import (
    EXAMPLE_07,
    EXECUTE_PARAMETERS,
    EXECUTE_WORKERS,
    EXECUTION_ORDER,
    REPORT_NOTEBOOKS,
    THREAD_VARIABLES,
    ExecutionFailed,
    execute_notebooks,
    executed_folder,
    source_notebook,
    stale_notebooks,
)
from stage import (
    BOOK,
    COURSE_ORDER,
    FILES,
    ROOT,
    STUDENT,
    STUDENT_PAGE,
    WIDGET_MIME,
    WIDGET_NOTE,
    MissingNotebooks,
    Stager,
    stage,
)

__all__ = [
    "BOOK",
    "COURSE_ORDER",
    "EXAMPLE_07",
    "EXECUTE_PARAMETERS",
    "EXECUTE_WORKERS",
    "EXECUTION_ORDER",
    "FILES",
    "REPORT_NOTEBOOKS",
    "ROOT",
    "STUDENT",
    "STUDENT_PAGE",
    "THREAD_VARIABLES",
    "WIDGET_MIME",
    "WIDGET_NOTE",
    "ExecutionFailed",
    "MissingNotebooks",
    "Site",
    "Stager",
    "build",
    "execute_notebooks",
    "executed_folder",
    "main",
    "source_notebook",
    "stage",
    "stale_notebooks",
]


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
