"""Per-frame descriptions written from the ground truth: the stand-in for StoryStream's GPT-4V/Qwen-VL ones.

StoryStream's narratives were built from per-keyframe descriptions that a vision-language model wrote. The lab
writes them from each frame's `FrameTruth` with one template, naming everything a frame shows:

    "Mira, a red round creature with a yellow hat, with Bo, in the forest, holding a key and a map,
     drawn in pixel style."

Unlike the story captions (pronouns, events, things remembered), a description is fully determined by what is
visible, so it is what stage 0 contrasts frames against: a tokenizer that matches frames to descriptions must
encode identity, companions, scene, props and style in its features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from labkit.core.errors import LabError
from labkit.data.storystream_mini import open_split
from labkit.data.storyworld import CHARACTERS, PROPS, SCENES

_CHARACTER = {c.name: c for c in CHARACTERS}
_SCENE = {s.name: s for s in SCENES}
_PROP = {p.name: p for p in PROPS}


def _listing(items: Sequence[str]) -> str:
    """ "a key", "a key and a map", "a key, a map and a ball"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe_frame(truth: Mapping) -> str:
    """One sentence naming the protagonist and look, companions, scene, props at hand and the art style."""
    try:
        hero = _CHARACTER[truth["protagonist"]]
        scene = _SCENE[truth["scene"]]
        companions = [name for name in truth.get("characters", ()) if name != hero.name]
        props = [f"{_PROP[name].article} {name}" for name in truth.get("props", ())]
        style = truth["style"]
    except KeyError as error:
        raise LabError(f"frame ground truth {dict(truth)!r}: unknown or missing {error}") from None
    parts = [f"{hero.name}, a {hero.look}"]
    if companions:
        parts.append(f"with {_listing(companions)}")
    parts.append(f"{scene.at} the {scene.name}")
    if props:
        parts.append(f"holding {_listing(props)}")
    return ", ".join(parts) + f", drawn in {style} style."


def describe_split(root: Path | str, split: str) -> list[list[str]]:
    """Descriptions of every frame of a split, [story][frame], in the split's story order."""
    data = open_split(root, split)
    out = []
    for record in data.records:
        annotation = data.annotations.get(str(record.id))
        if annotation is None:
            raise LabError(f"{Path(root) / (split + '.annotations.jsonl')}: no ground truth for story {record.id!r}")
        out.append([describe_frame(frame) for frame in annotation["frames"]])
    return out
