"""Staging the course site's sources into build/book/src, in the layout they have in the repository (README.md
becomes index.md; the executed notebooks take the place of notebooks/*.ipynb, so links to a notebook land on its
executed page), with _toc.yml and _config.yml beside them for Sphinx. Staging rewrites every relative link of the
Markdown (and of the notebooks' Markdown):

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
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from execute import EXAMPLE_07, REPORT_NOTEBOOKS, executed_folder

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
COURSE_ORDER = ["README", "syllabus", "reading_group", "exercises", "answer_key", "runtimes", "instructor_notes"]
STUDENT = "course/student"
STUDENT_PAGE = "student_notebooks.md"
FILES = "_files"  # downloads are staged under src/_files/<path in the checkout> (excluded from the documents)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = (
    "*An interactive explorer (ipywidgets) is drawn here when the notebook runs: open it with `make lab`, or the"
    " explorers as an app with `make demo`.*"
)


class MissingNotebooks(RuntimeError):
    pass


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


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
