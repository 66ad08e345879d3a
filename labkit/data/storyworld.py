"""StoryStream-mini: a deterministic procedural story world (docs/paper_to_code.md, "StoryStream").

The real StoryStream (48 GB of cartoon keyframes with GPT-4 narratives) cannot be downloaded here, so the lab
writes its own stories: a fixed cast with distinct looks (shape, colour, accessory), one art style per story,
scenes and props, and captions from a small narrative grammar. Caption 0 introduces the protagonist by name
and look; later captions say "she"/"he"/"they" and refer back to props found, friends met and places seen
many frames earlier, so continuing a story well needs the long context that SEED-Story's multimodal attention
sink is meant to keep. Every frame carries its ground truth (`FrameTruth`) for the judges and metrics.

Everything is a pure function of the seed: each story draws from its own `random.Random(seed)`.
Drawing lives in `storyworld_render.py`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

from PIL import Image

from labkit.core.errors import ParameterError
from labkit.data import storyworld_render as draw
from labkit.data.catalogue import (
    _CHARACTER,
    _PRONOUNS,
    _PROP,
    _SCENE,
    _STYLE,
    CHARACTERS,
    PROPS,
    SCENES,
    STYLES,
    Character,
    FrameLayout,
    Scene,
)

RGB = tuple[int, int, int]


class StoryWorldError(ParameterError, ValueError):
    """A bad argument: a ValueError for Python callers, a one-line LabError for the CLI."""


# ---------------------------------------------------------------------------------------------------------
# Stories


@dataclass(frozen=True)
class FrameTruth:
    characters: tuple[str, ...]  # visible, protagonist first
    protagonist: str
    style: str
    scene: str
    props: tuple[str, ...]  # found so far, in order found; never shrinks
    event: str  # "intro", "find:key", "meet:Bo", "part:Bo", "travel:beach", "use:key", "recall:key",
    #             "remember:beach", "miss:Bo", "act:<rest|look|jump|...>", "end"


@dataclass(frozen=True)
class Story:
    id: str
    seed: int
    protagonist: str
    style: str
    captions: tuple[str, ...]
    frames: tuple[FrameTruth, ...]
    layouts: tuple[FrameLayout, ...]

    def __len__(self) -> int:
        return len(self.frames)


MAX_PROPS_PER_STORY = 5  # long stories run out of new things to find and recall old ones instead

_POSES = MappingProxyType(
    {
        "meet": "wave",
        "part": "wave",
        "travel": "walk",
        "act:rest": "sit",
        "act:jump": "jump",
        "act:dance": "jump",
        "act:walk": "walk",
        "act:wave": "wave",
        "find": "stand",
    }
)

# Templates. Fields: the protagonist (Name, Sub/sub, Pos/pos, obj), the current scene (scene, at, adj, sight, spot),
# the companion (Friend, fobj, look), a prop (prop, a_prop, use, found_at) and an earlier place (place).
_T = MappingProxyType(
    {
        "intro": (
            "Once upon a time, {Name}, a small {look}, lived {at} the {adj} {scene}.",
            "This is {Name}, a little {look}, who lived {at} the {adj} {scene}.",
            "{At} the {adj} {scene} there lived {Name}, a small {look}.",
        ),
        "find": (
            "{Sub} found {a_prop} {spot} and picked it up carefully.",
            "Suddenly {sub} saw {a_prop} lying {spot} and took it along.",
            "{Name} was happy to find {a_prop} {spot} {at} the {scene}.",
        ),
        "find+": ("{Friend} pointed at {a_prop} {spot}, and {sub} picked it up.",),
        "meet": (
            "{At} the {scene}, {sub} met {Friend}, {a_look}.",
            "{A_look} named {Friend} came to say hello to {obj}.",
            "{Sub} made a new friend, {Friend}, {a_look}.",
        ),
        "part": (
            "{Friend} waved goodbye to {obj} and went back home.",
            "It was time for {Friend} to go home, so {sub} waved goodbye.",
        ),
        "travel": (
            "{Sub} walked a long way and came to the {adj} {scene}.",
            "Next, {sub} set off for the {scene} to see what was there.",
            "{Pos} path led {obj} all the way to the {adj} {scene}.",
        ),
        "travel+": (
            "{Sub} and {Friend} travelled together to the {adj} {scene}.",
            "{Pos} friend {Friend} followed {obj} to the {scene}.",
        ),
        "return": (
            "{Sub} went back to the {scene}, where {sub} had been before.",
            "Once again {sub} came to the {adj} {scene} and looked around.",
        ),
        "use": (
            "{Sub} used the {prop} to {use}.",
            "The {prop} helped {obj} {use}.",
            "{Sub} took out the {prop} to {use}.",
        ),
        "use+": ("{Sub} and {Friend} used the {prop} to {use}.",),
        "recall": (
            "{Sub} still carried the {prop} {sub} found {found_at}.",
            "{Sub} looked at the {prop} from the {place} and smiled.",
            "The {prop} from the {place} was still safe with {obj}.",
        ),
        "remember": (
            "{Sub} thought about the {place} and all the things {sub} saw there.",
            "Remembering the {place}, {sub} felt warm and happy inside.",
        ),
        "remember+": (
            "{Sub} told {Friend} all about the {place}.",
            "{Friend} asked {obj} about the {place}, and {sub} told a long story.",
        ),
        "miss": (
            "{Sub} missed {pos} old friend {Friend} and hoped to see {fobj} again.",
            "{Sub} thought of {Friend}, the friend who had gone home.",
        ),
        "end": (
            "At the end of the day, {sub} went home with {things}.",
            "When the sun went down, {sub} went home with {things}, tired and happy.",
        ),
        "end0": ("At the end of the day, {sub} went home, still thinking about the {place}.",),
        "act:rest": (
            "{Sub} sat down {at} the {scene} to rest for a little while.",
            "Feeling tired, {sub} sat down and rested for a while.",
        ),
        "act:look": (
            "{Sub} stopped for a moment to look at {sight}.",
            "{Sub} looked at {sight} with big curious eyes.",
        ),
        "act:jump": (
            "{Sub} jumped high into the air with a happy shout.",
            "Full of joy, {sub} jumped up and down {at} the {scene}.",
        ),
        "act:sing": (
            "{Sub} sang a little song that {sub} had learned long ago.",
            "{Sub} hummed a happy tune while the wind blew softly.",
        ),
        "act:dance": (
            "{Sub} danced a happy dance in the middle of the {scene}.",
            "{Sub} spun around and danced all by {self}.",
        ),
        "act:walk": (
            "{Sub} walked slowly through the {scene}, looking for something new.",
            "{Sub} went for a long walk {at} the {scene}.",
        ),
        "act:rest+": (
            "{Sub} and {Friend} sat down together to rest for a while.",
            "After all the fun, {sub} and {Friend} sat down to rest.",
        ),
        "act:look+": ("{Sub} and {pos} friend {Friend} looked at {sight} together.",),
        "act:jump+": ("{Sub} and {Friend} jumped up and down and laughed.",),
        "act:talk+": (
            "{Friend} told {obj} a funny story, and they both laughed.",
            "{Sub} and {Friend} talked about what to do next.",
        ),
        "act:play+": (
            "{Sub} and {Friend} played a game of tag {at} the {scene}.",
            "{Sub} and {Friend} played hide and seek {at} the {scene}.",
        ),
        "act:wave+": ("{Friend} waved at {obj}, and {sub} waved back happily.",),
    }
)
_SOLO_ACTS = ("act:rest", "act:look", "act:jump", "act:sing", "act:dance", "act:walk")
_DUO_ACTS = ("act:rest", "act:look", "act:jump", "act:talk", "act:play", "act:wave")


@dataclass
class _Plot:
    """The story's state while it is being written (local to one generate_story call)."""

    hero: Character
    scene: Scene
    visited: list[str]
    found: list[tuple[str, str]] = field(default_factory=list)  # (prop, scene where found)
    friend: Character | None = None
    friend_since: int = 0
    old_friends: list[Character] = field(default_factory=list)
    points: int = 0  # plot points told so far


def _key_events(frames: int, slots: int) -> list[str]:
    """The plot points a story of this length must contain, most important first, cut to fit `slots`."""
    finds = min(MAX_PROPS_PER_STORY, max(1, frames // 8))
    travels = max(1, round(frames / 10)) if frames >= 3 else 0
    meets = 1 + (frames - 1) // 35 if frames >= 4 else 0
    keys = ["find"] * finds + ["meet"] * min(meets, 1) + ["travel"] * travels + ["part", "meet"] * (meets - 1)
    return keys[:slots]


def _pick_key(rng: random.Random, plot: _Plot, keys: list[str], i: int, forced: bool, last: str) -> str | None:
    def weight(kind: str) -> float:
        if kind == "meet":  # one companion at a time, not in the very frame after the last one left
            if plot.friend is not None or (last == "part" and not forced):
                return 0.0
            if plot.old_friends:
                return 1.0
            return 1e6 if plot.points >= 2 else 6.0  # the first companion comes early and stays long
        if kind == "part":  # a friend stays a while before leaving
            return 1.0 if plot.friend is not None and (forced or i - plot.friend_since >= 6) else 0.0
        return 0.3 if kind == last else 1.0

    kinds = sorted(set(keys))
    weights = [weight(k) for k in kinds]
    if sum(weights) == 0:
        return None
    return rng.choices(kinds, weights)[0]


def _pick_filler(rng: random.Random, plot: _Plot, last: str) -> str:
    options = {"act": 4.0}
    if plot.found:
        options.update(use=2.0, recall=2.0)
    if any(name != plot.scene.name for name in plot.visited):
        options["remember"] = 1.5
    if plot.old_friends:
        options["miss"] = 0.7
    if last in options:  # avoid saying the same kind of thing twice in a row
        options[last] *= 0.25
    return rng.choices(list(options), list(options.values()))[0]


def _fields(rng: random.Random, plot: _Plot) -> dict[str, str]:
    hero, scene = plot.hero, plot.scene
    f = dict(
        Name=hero.name,
        sub=hero.pronoun,
        Sub=hero.pronoun.capitalize(),
        pos=hero.possessive,
        Pos=hero.possessive.capitalize(),
        obj=hero.objective,
        self=_PRONOUNS[hero.pronoun][2],
        scene=scene.name,
        at=scene.at,
        At=scene.at.capitalize(),
        adj=rng.choice(scene.adjectives),
        sight=scene.sight,
        spot=scene.spot,
    )
    if plot.friend is not None:
        f.update(Friend=plot.friend.name, fobj=plot.friend.objective)
    return f


def _say(rng: random.Random, template_key: str, fields: dict[str, str], **extra: str) -> str:
    text = rng.choice(_T[template_key]).format(**{**fields, **extra})
    return text[0].upper() + text[1:]


def _fresh(rng: random.Random, options: list, label: Callable[[object], str], last_event: str):
    """A random option whose event label differs from the previous frame's, when there is one."""
    return rng.choice([o for o in options if label(o) != last_event] or options)


def _event(rng: random.Random, plot: _Plot, kind: str, i: int, last_event: str) -> tuple[str, str]:
    """Advance the plot by one frame of the given kind; returns (event label, caption)."""
    f = _fields(rng, plot)
    duo = "+" if plot.friend is not None else ""
    if kind == "find":
        prop = rng.choice([p for p in PROPS if p.name not in {n for n, _ in plot.found}])
        plot.found.append((prop.name, plot.scene.name))
        key = "find+" if duo and rng.random() < 0.3 else "find"
        return f"find:{prop.name}", _say(rng, key, f, a_prop=f"{prop.article} {prop.name}")
    if kind == "meet":
        taken = {plot.hero.name} | {c.name for c in plot.old_friends}
        plot.friend, plot.friend_since = rng.choice([c for c in CHARACTERS if c.name not in taken]), i
        a_look = ("an " if plot.friend.look[0] in "aeiou" else "a ") + plot.friend.look
        f.update(Friend=plot.friend.name, a_look=a_look, A_look=a_look.capitalize())
        return f"meet:{plot.friend.name}", _say(rng, "meet", f)
    if kind == "part":
        gone = plot.friend
        plot.old_friends.append(gone)
        plot.friend = None  # still in this frame, waving; gone from the next one
        return f"part:{gone.name}", _say(rng, "part", f)
    if kind == "travel":
        unseen = [s for s in SCENES if s.name not in plot.visited]
        plot.scene = rng.choice(unseen or [s for s in SCENES if s is not plot.scene])
        key = "return" if plot.scene.name in plot.visited else "travel" + duo
        plot.visited.append(plot.scene.name)
        f = _fields(rng, plot)
        return f"travel:{plot.scene.name}", _say(rng, key, f)
    if kind in ("use", "recall"):
        name, place = _fresh(rng, plot.found, lambda o: f"{kind}:{o[0]}", last_event)
        key = "use" + duo if kind == "use" and duo and rng.random() < 0.3 else kind
        return f"{kind}:{name}", _say(
            rng, key, f, prop=name, use=_PROP[name].use, place=place, found_at=f"{_SCENE[place].at} the {place}"
        )
    if kind == "remember":
        places = sorted({n for n in plot.visited if n != plot.scene.name})
        place = _fresh(rng, places, lambda o: f"remember:{o}", last_event)
        key = "remember+" if duo and rng.random() < 0.4 else "remember"
        return f"remember:{place}", _say(rng, key, f, place=place)
    if kind == "miss":
        old = rng.choice(plot.old_friends)
        return f"miss:{old.name}", _say(rng, "miss", f, Friend=old.name, fobj=old.objective)
    if kind == "end":
        if plot.found:
            names = [f"the {n}" for n, _ in plot.found]
            things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            return "end", _say(rng, "end", f, things=things)
        return "end", _say(rng, "end0", f, place=plot.visited[0])
    act = _fresh(rng, list(_DUO_ACTS if duo else _SOLO_ACTS), str, last_event)
    return act, _say(rng, act + duo, f)


def _layout(rng: random.Random, event: str, with_friend: bool) -> FrameLayout:
    x = rng.uniform(0.3, 0.7)
    friend_side = -1 if x > 0.5 else 1  # the companion goes where there is more room
    pose = _POSES.get(event, _POSES.get(event.split(":")[0], rng.choice(("stand", "stand", "walk"))))
    facing = friend_side if with_friend and rng.random() < 0.7 else rng.choice((-1, 1))
    return FrameLayout(
        x=round(x, 4),
        ground=round(rng.uniform(0.86, 0.95), 4),
        scale=round(rng.uniform(0.82, 1.12), 4),
        pose=pose,
        facing=facing,
        friend_side=friend_side,
        shift=round(rng.uniform(-0.1, 0.1), 4),
    )


def generate_story(seed: int, story_id: str, frames: int = 30) -> Story:
    """The plot, captions, per-frame ground truth and layout of one story; a pure function of `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StoryWorldError("seed", f"must be a non-negative int (got {seed!r})")
    if not isinstance(story_id, str) or not story_id:
        raise StoryWorldError("story_id", f"must be a non-empty string (got {story_id!r})")
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= 100:
        raise StoryWorldError("frames", f"must be an int in [2, 100] (got {frames!r})")
    rng = random.Random(seed)
    hero, style, start = rng.choice(CHARACTERS), rng.choice(STYLES), rng.choice(SCENES)
    plot = _Plot(hero=hero, scene=start, visited=[start.name])
    f = _fields(rng, plot)
    captions = [_say(rng, "intro", f, look=hero.look)]
    truths = [FrameTruth((hero.name,), hero.name, style.name, start.name, (), "intro")]
    layouts = [_layout(rng, "intro", False)]
    end = frames - 1 if frames >= 6 else frames  # long enough stories close with a look back
    slots = end - 1  # frames 1 .. end-1 are free for plot points
    keys = _key_events(frames, slots)
    stretch = slots // max(1, len(keys))  # one plot point per stretch of the story, so they spread out
    plan = {1 + k * slots // len(keys) + rng.randrange(stretch) for k in range(len(keys))}
    due, last, last_event = 0, "intro", "intro"
    for i in range(1, frames):
        due += i in plan
        kind = "end" if i == end else None
        if kind is None and due:
            kind = _pick_key(rng, plot, keys, i, len(keys) >= end - i, last)
            if kind is not None:  # else the plot point waits for a frame where it makes sense
                keys.remove(kind)
                due, plot.points = due - 1, plot.points + 1
        if kind is None:
            kind = _pick_filler(rng, plot, last)
        visible = (hero.name,) + ((plot.friend.name,) if plot.friend else ())  # before a "part" clears it
        event, caption = _event(rng, plot, kind, i, last_event)
        if kind == "meet":
            visible = (hero.name, plot.friend.name)
        truths.append(
            FrameTruth(visible, hero.name, style.name, plot.scene.name, tuple(n for n, _ in plot.found), event)
        )
        captions.append(caption)
        layouts.append(_layout(rng, event, len(visible) > 1))
        last, last_event = kind, event
    return Story(story_id, seed, hero.name, style.name, tuple(captions), tuple(truths), tuple(layouts))


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024:
        raise StoryWorldError("size", f"must be an int in [32, 1024] pixels (got {size!r})")


def render_frame(story: Story, index: int, size: int = 64) -> Image.Image:
    """Frame `index` of `story` as a size x size RGB image; the same arguments give the same pixels."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(story.frames):
        raise StoryWorldError("index", f"must be an int in [0, {len(story.frames) - 1}] (got {index!r})")
    _check_size(size)
    truth, layout = story.frames[index], story.layouts[index]
    hero = _CHARACTER[truth.protagonist]
    friends = [_CHARACTER[name] for name in truth.characters[1:]]
    return draw.compose(
        size,
        _STYLE[truth.style],
        _SCENE[truth.scene],
        hero,
        friends,
        truth.props,
        layout,
        wave_friend=truth.event.startswith(("meet:", "part:")),
        seed=(story.seed, index),
    )


def render_character_sheet(size: int = 64) -> Image.Image:
    """Every character (columns) in every style (rows), standing in the meadow; for docs and notebooks."""
    _check_size(size)
    sheet = Image.new("RGB", (size * len(CHARACTERS), size * len(STYLES)))
    layout = FrameLayout(x=0.5, ground=0.9, scale=1.0, pose="stand", facing=1, friend_side=1, shift=0.0)
    for row, style in enumerate(STYLES):
        for col, character in enumerate(CHARACTERS):
            tile = draw.compose(size, style, _SCENE["meadow"], character, [], (), layout, seed=(row, col))
            sheet.paste(tile, (col * size, row * size))
    return sheet
