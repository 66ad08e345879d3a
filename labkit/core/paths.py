"""Where things live: the checkout, generated artifacts, committed reference checkpoints, optional real weights.

Every folder the lab reads or writes is named here once, so a reader can see the whole layout in one place
(`docs/architecture.md` draws it).
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS_ENV = "LABKIT_CHECKPOINTS"


def project_root() -> Path:
    """The checkout this package lives in (the folder with pyproject.toml)."""
    return Path(__file__).resolve().parents[2]


def artifacts_folder(preset: str) -> Path:
    """Where generated data and trained stages go (git-ignored): artifacts/<preset>/."""
    return project_root() / "artifacts" / preset


def checkpoints_folder(preset: str) -> Path:
    """Where reference checkpoints live: checkpoints/<preset>/, or the folder the LABKIT_CHECKPOINTS environment
    variable names (`labkit report --retrain` sets it, so the notebooks papermill starts use the retrained ones)."""
    override = os.environ.get(CHECKPOINTS_ENV)
    return Path(override) if override else project_root() / "checkpoints" / preset


def quick_folder(preset: str) -> Path:
    """Where `quick` (minutes-long) training runs put their artifacts: artifacts/<preset>/quick/."""
    return artifacts_folder(preset) / "quick"


def portable_path(path: Path | str) -> str:
    """A path inside the checkout written relative to it, so committed records name no machine's folders."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(project_root())) if project_root() in resolved.parents else str(path)


def weights_folder() -> Path:
    """Where the lab looks for optional weights the user put there: $LABKIT_WEIGHTS or ~/.cache/seed-story-lab."""
    return Path(os.environ.get("LABKIT_WEIGHTS", Path.home() / ".cache" / "seed-story-lab"))
