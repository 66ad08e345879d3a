"""Table 4, paired: stage 3's effect measured on the very same held-out pairs, with intervals."""

from __future__ import annotations

import torch

from labkit.core.paths import project_root
from labkit.core.presets import get_preset
from labkit.metrics.intervals import verdict
from labkit.training.detokenizer_eval import EvalFrames, paired_change
from labkit.training.stage0 import load_judges


def test_paired_change_is_zero_for_the_same_images_and_negative_for_washed_out_ones():
    judges = load_judges(get_preset("tiny"))
    truth = EvalFrames.from_split(project_root() / "data_samples" / "storystream-mini", "test")
    same = paired_change(truth.images, truth.images, truth, judges)
    assert same["n"] == len(truth.images)
    assert same["fid_gain"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    assert verdict(*same["character_accuracy_gain"]["ci95"], paper_direction=1) == "inconclusive"
    washed_out = (truth.images.float() * 0.3).to(torch.uint8)
    worse = paired_change(washed_out, truth.images, truth, judges)
    assert verdict(*worse["fid_gain"]["ci95"], paper_direction=1) == "contradicted"
    assert worse["character_accuracy_gain"]["difference"] < 0
