"""Training stages, as in the paper (stage 1 de-tokenizer, stage 2 MLLM, stage 3 adaptation), plus stage 0.

Stage 0 exists only in the lab: the paper reads images through a pretrained Qwen-VL ViT-bigG and scores them with
pretrained networks; at `tiny` neither exists, so stage 0 trains a visual tokenizer and the judges.

Every stage writes an artifact folder (weights + manifest). A reference checkpoint, committed under
`checkpoints/<preset>/<name>`, wins over a `quick` one trained locally under `artifacts/<preset>/quick/<name>`.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import MANIFEST


def locate_artifact(name: str, preset: str) -> Path | None:
    """The reference checkpoint checkpoints/<preset>/<name> if present, else artifacts/<preset>/quick/<name>, else None."""
    from ..report import project_root

    root = project_root()
    for folder in (root / "checkpoints" / preset / name, root / "artifacts" / preset / "quick" / name):
        if (folder / MANIFEST).is_file():
            return folder
    return None
