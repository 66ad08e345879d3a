"""The de-tokenizer playground: draw a test frame from its true features, from the features the MLLM regresses
for it, and from a mix of two characters' features, with the judges' verdicts under each (paper §3.1, Table 4).

The regressed features are what stage 3 adapts the de-tokenizer to (`labkit.training.stage3.compute_regressed`:
the frame's story up to it, through the trained MLLM). Guidance scale, sampling steps and the seed act on the
drawing only (`Detokenizer.sample`, Euler with classifier-free guidance against the blank frame).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from labkit.core.presets import get_preset
from labkit.data.frames import CHARACTER_NAMES
from labkit.experiments.story_ablation import load_detokenizer
from labkit.training.stage3 import compute_regressed
from labkit.widgets.common import PlotArea, explorer, parse_int, reference_inputs

ADAPTATIONS = {"off": "stage 1", "official": "stage 3, official mode", "full": "stage 3, full fine-tune"}


def drawn_frames(detokenizer, features: torch.Tensor, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """uint8 images [B, 3, H, W] of feature sets [B, N, D], one noise seed for all."""
    if steps < 1 or steps > 100:
        raise ValueError(f"steps: must be between 1 and 100 (got {steps})")
    return detokenizer.sample(features, steps=steps, guidance_scale=guidance, seed=seed)


def plot_playground(images: torch.Tensor, titles: list[str], verdicts: list[str]):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.6))
    for axis, image, title, verdict in zip(axes, images, titles, verdicts):
        axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(verdict, fontsize=8)
        axis.set(xticks=[], yticks=[])
    figure.tight_layout()
    return figure


def detokenizer_playground(preset: str = "tiny"):
    """Adaptation, story, frame, the second character's story, the mix, guidance, steps and seed."""
    import ipywidgets as widgets

    config, inputs = get_preset(preset), reference_inputs(preset)
    model, tokenizer, frames, features, judges = (
        inputs.model,
        inputs.tokenizer,
        inputs.frames,
        inputs.features,
        inputs.judges,
    )
    chunk = config.data.chunk_length
    targets = [f for f in range(frames.frames) if f % chunk]  # a chunk's first frame is given, never regressed
    controls = {
        "adaptation": widgets.Dropdown(options=[(v, k) for k, v in ADAPTATIONS.items()], description="de-tokenizer"),
        "story": widgets.BoundedIntText(value=0, min=0, max=frames.stories - 1, description="test story"),
        "frame": widgets.Dropdown(options=targets, value=targets[0], description="frame"),
        "other": widgets.BoundedIntText(value=1, min=0, max=frames.stories - 1, description="mix with story"),
        "mix": widgets.FloatSlider(value=0.5, min=0, max=1, step=0.05, description="mix"),
        "guidance": widgets.FloatSlider(value=3.0, min=1.0, max=8.0, step=0.5, description="guidance"),
        "steps": widgets.IntSlider(value=10, min=1, max=30, description="steps"),
        "seed": widgets.Text(value="0", description="seed", continuous_update=False),
    }
    area = PlotArea()

    @lru_cache(maxsize=8)
    def regressed(story: int):
        return compute_regressed(model, tokenizer, [frames.captions[story]], features[story : story + 1], chunk)

    def draw():
        v = {name: control.value for name, control in controls.items()}
        seed = parse_int(v["seed"], "seed", 0, 2**31 - 1)
        for name in ("story", "other"):
            if not 0 <= v[name] < frames.stories:
                raise ValueError(f"{name}: must be in 0..{frames.stories - 1} (got {v[name]})")
        area.message.value = "drawing…"
        pairs = regressed(v["story"])
        regressed_features = pairs.features[(pairs.frame == v["frame"]).nonzero()[0, 0]]
        true, other = features[v["story"], v["frame"]], features[v["other"], v["frame"]]
        mixed = (1 - v["mix"]) * true + v["mix"] * other
        detokenizer = load_detokenizer(v["adaptation"], config)
        drawn = drawn_frames(
            detokenizer, torch.stack([true, regressed_features, mixed]), v["steps"], v["guidance"], seed
        )
        area.message.value = ""
        images = torch.cat([frames.images[v["story"], v["frame"]][None], drawn])
        who = judges.predict_character(images).tolist()
        truth = [int(frames.protagonist[v["story"], v["frame"]])] * 3 + [None]
        cosine = float(torch.nn.functional.cosine_similarity(regressed_features, true, dim=-1).mean())
        marks = ["" if t is None else (" ✓" if w == t else " ✗") for w, t in zip(who, truth)]
        verdicts = [f"judge: {CHARACTER_NAMES[w]}{mark}" for w, mark in zip(who, marks)]
        titles = [
            f"real frame {v['frame']}: {CHARACTER_NAMES[truth[0]]}",
            "from its true features",
            f"from regressed features (cos {cosine:.3f})",
            f"{1 - v['mix']:.2f} this + {v['mix']:.2f} story {v['other']}'s",
        ]
        return plot_playground(images, titles, verdicts)

    return explorer(controls, area, draw, [3, 2, 3])
