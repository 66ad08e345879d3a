"""Shared fixtures: one small StoryStream-mini data set made once per test session; and the notebooks nbval
executed in this session, kept for the book test (`NbvalNotebooks`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.data.storystream_mini import MakeConfig, make_dataset

SMALL = MakeConfig(
    train_stories=4, val_stories=1, test_stories=1, frames=12, size=32, seed=7, bpe_merges=200, image_tokens=8
)


@pytest.fixture(scope="session")
def small_config() -> MakeConfig:
    """How `small_dataset` was made (a test module cannot import this file: `conftest` names every conftest.py)."""
    return SMALL


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A 4/1/1-story data set of 12 frames at 32 px (about a second to make)."""
    root = tmp_path_factory.mktemp("data") / "mini"
    make_dataset(root, SMALL, progress=False)
    return root


# ---- the notebooks nbval executed, for the book test -------------------------------------------------------------
# `make test` runs nbval over notebooks/ in the same session as tests/browser/test_book.py, which needs every report
# notebook executed to build the course site. Rather than execute them all a second time (about 4 minutes on two
# cores), the book test runs last and builds from what nbval's kernels printed and drew.

NBVAL_NOTEBOOKS = "labkit-nbval-notebooks"


class NbvalNotebooks:
    """Each notebook nbval ran in this session with every code cell's outputs, as nbval's kernel produced them."""

    def __init__(self):
        self.runs: dict[str, dict] = {}  # notebook path -> {"nb": nbval's notebook, "outputs": {cell: outs}, ...}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        if call.when != "call" or type(item).__name__ != "IPyNbCell":
            return
        report = outcome.get_result()
        notebook = item.parent.nb
        run = self.runs.setdefault(str(item.path), {"nb": notebook, "outputs": {}, "failed": False})
        index = next(i for i, cell in enumerate(notebook.cells) if cell is item.cell)
        run["outputs"][index] = item.test_outputs
        run["failed"] = run["failed"] or not report.passed

    def executed(self, source: Path) -> dict | None:
        """`source` (a notebook of notebooks/) with the outputs of this session's nbval run, as an nbformat dict;
        None when nbval did not run all its code cells or one failed."""
        import copy

        run = self.runs.get(str(source))
        if run is None or run["failed"]:
            return None
        notebook = copy.deepcopy(run["nb"])
        code = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
        if any(run["outputs"].get(i) is None for i in code):
            return None
        for count, i in enumerate(code, 1):
            notebook.cells[i].outputs = copy.deepcopy(run["outputs"][i])
            notebook.cells[i].execution_count = count
            for output in notebook.cells[i].outputs:
                if output.output_type == "execute_result":
                    output.execution_count = count
        return notebook


def pytest_configure(config):
    config.pluginmanager.register(NbvalNotebooks(), NBVAL_NOTEBOOKS)


def pytest_collection_modifyitems(config, items):
    """With nbval's notebooks in the session, the book test goes last: it builds from what they printed."""
    book = {id(item) for item in items if item.nodeid.startswith("tests/browser/test_book.py")}
    if book and any(type(item).__name__ == "IPyNbCell" for item in items):
        items[:] = [item for item in items if id(item) not in book] + [item for item in items if id(item) in book]
