"""The artifact registry's training half: for each artifact named in `labkit.core.artifacts.ARTIFACTS` (what it
is, what it needs, the command that builds it), the function that trains it and the one that loads it.

`labkit train` and `labkit report --retrain` train through `TRAINERS`; notebooks and experiments load through
`load()`, which goes through `require()` and so never trains (`docs/architecture.md`, "The artifact graph").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from labkit.core.artifacts import ARTIFACTS, require
from labkit.core.presets import Preset
from labkit.models.visual_tokenizer import VisualTokenizer
from labkit.training.common import StageRun
from labkit.training.lm import load_lm, train_lm
from labkit.training.stage0 import judge_config, load_judges_artifact, train_judges, train_stage0
from labkit.training.stage1 import load_detokenizer_artifact, load_vae, train_stage1, train_vae
from labkit.training.stage2 import load_mllm, train_stage2
from labkit.training.stage3 import train_stage3
from labkit.training.stage3_paper import load_paper_stage3

# Each trainer takes a `StageRun` (preset, schedule, steps, folders, ...) and returns the manifest.
TRAINERS: dict[str, Callable[[StageRun], dict]] = {
    "visual_tokenizer": train_stage0,
    "judges": train_judges,
    "lm": train_lm,
    "vae": train_vae,
    "mllm": train_stage2,
    "detokenizer": train_stage1,
    "detokenizer_official": lambda run: train_stage3(run, mode="official"),
    "detokenizer_full": lambda run: train_stage3(run, mode="full"),
}


def load_stage3(folder: Path, preset: Preset) -> object:
    """A stage-3 de-tokenizer: at a pretrained-weights preset its trained tensors on the weights folder's base."""
    if preset.pretrained_weights:
        return load_paper_stage3(folder, preset)[0]
    return load_detokenizer_artifact(folder, preset, "stage3")[0]


# Each loader takes (folder, preset) and returns the model (for the LM and the MLLM: model, tokenizer, manifest).
LOADERS: dict[str, Callable[[Path, Preset], object]] = {
    "visual_tokenizer": lambda folder, preset: VisualTokenizer.from_pretrained(folder, preset),
    "judges": lambda folder, preset: load_judges_artifact(folder, preset, judge_config(preset))[0],
    "lm": load_lm,
    "vae": load_vae,
    "mllm": load_mllm,
    "detokenizer": lambda folder, preset: load_detokenizer_artifact(folder, preset)[0],
    "detokenizer_official": load_stage3,
    "detokenizer_full": load_stage3,
}
assert TRAINERS.keys() == LOADERS.keys() == ARTIFACTS.keys(), "every artifact has a trainer and a loader"


def load(name: str, preset: Preset) -> object:
    """The artifact `name` of `preset`, loaded; a missing or stale one is a LabError naming its train command."""
    return LOADERS[name](require(name, preset.name), preset)


def require_needs(names: set[str], preset: Preset) -> None:
    """Check, before any training, that every artifact the trainers of `names` read is there and valid (an
    artifact that is itself among `names` will be trained first)."""
    for name in sorted(names):
        for need in ARTIFACTS[name].needs:
            if need not in names:
                require(need, preset.name)
