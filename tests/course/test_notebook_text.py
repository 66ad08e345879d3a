"""The notebooks as course material: each opens with objectives, prerequisites, the paper's sections and a measured
runtime line, and closes with a summary, discussion questions and exercises; no runtime is typed into markdown, and
every number a "Look for" / "What we see" paragraph quotes is backed by a claim cell that recomputes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from labkit.course.versions import outline

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("0[0-8]_*.ipynb"))
TYPED_RUNTIME = re.compile(r"\b\d+(?:\.\d+)?\s*(?:s|sec|seconds?|min|minutes?|h|hours?|CPU[- ]min(?:utes)?)\b(?!-)")
# a decimal ("3.41") or a ratio or share ("16×", "5x", "46%"): what a sentence quotes from a result
QUOTED_NUMBER = re.compile(r"(?<![\w.\-/])(\d+\.\d+|\d+(?=\s*(?:×|x\b|%)))")
CLAIM_PARAGRAPH = re.compile(r"Look for|What we see|we measured|measured:|The committed", re.I)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def text(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_with_objectives_and_closes_with_questions_and_exercises(path):
    o = outline(path)
    opening = text(cells(path)[0])
    assert o.objectives >= 3, f"{path.name}: {o.objectives} learning objectives (want 3 or more)"
    assert "**Prerequisites:**" in opening and "**Paper:**" in opening, (
        f"{path.name}: opening lacks prerequisites/paper"
    )
    assert any(f'runtime_line("{path.stem}")' in text(c) for c in cells(path) if c["cell_type"] == "code"), (
        f"{path.name}: no code cell prints runtime_line({path.stem!r})"
    )
    closing = "\n".join(text(c) for c in cells(path)[-3:] if c["cell_type"] == "markdown")
    assert "## Summary" in closing, f"{path.name}: no '## Summary' near the end"
    assert o.questions >= 3, f"{path.name}: {o.questions} discussion questions (want 3 or more)"
    assert 2 <= o.exercises <= 4, f"{path.name}: {o.exercises} exercises in its closing '## Exercises' (want 2-4)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_runtime_is_typed_into_markdown(path):
    typed = [m.group(0) for c in cells(path) if c["cell_type"] == "markdown" for m in TYPED_RUNTIME.finditer(text(c))]
    assert not typed, f"{path.name}: runtimes typed into markdown {typed}: print them with runtime_line instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_quoted_result_is_backed_by_a_claim(path):
    claims = "\n".join(text(c) for c in cells(path) if c["cell_type"] == "code" and "claim" in text(c))
    unbacked = []
    for cell in cells(path):
        if cell["cell_type"] != "markdown":
            continue
        for paragraph in text(cell).split("\n\n"):
            if paragraph.lstrip().startswith("|") or not CLAIM_PARAGRAPH.search(paragraph):
                continue
            unbacked += [n for n in QUOTED_NUMBER.findall(paragraph) if f'"{n}"' not in claims]
    assert not unbacked, (
        f"{path.name}: 'Look for' / 'What we see' paragraphs quote {unbacked} but no claim cell "
        "checks them (labkit.course.claims.claim): print them from the computed values or claim them"
    )
