"""The story world's catalogue: its cast, art styles, scenes and props, and how a frame is laid out.

Shared by the story grammar (`storyworld.py`) and the drawing code (`storyworld_render.py`), so that neither
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

RGB = tuple[int, int, int]

_PRONOUNS = MappingProxyType(
    {"she": ("her", "her", "herself"), "he": ("him", "his", "himself"), "they": ("them", "their", "themselves")}
)


@dataclass(frozen=True)
class Character:
    name: str
    pronoun: str  # "she" | "he" | "they"
    shape: str  # body silhouette; also the word captions use ("a red round creature")
    colour: str
    rgb: RGB
    accessory: str
    accessory_colour: str
    accessory_rgb: RGB

    @property
    def objective(self) -> str:
        return _PRONOUNS[self.pronoun][0]

    @property
    def possessive(self) -> str:
        return _PRONOUNS[self.pronoun][1]

    @property
    def look(self) -> str:
        article = "" if self.accessory.endswith("s") else "a "  # "a yellow hat", "black glasses"
        return f"{self.colour} {self.shape} creature with {article}{self.accessory_colour} {self.accessory}"


@dataclass(frozen=True)
class Style:
    """An art style, as parameters of one rendering pipeline (see storyworld_render.compose)."""

    name: str
    description: str
    fill_mix: float = 0.0  # blend character colours toward `wash` (pastel fills)
    scene_mix: float = 0.0  # blend scene colours toward `wash`
    wash: RGB = (255, 255, 255)
    outline: float = 0.0  # outline width as a fraction of the frame; 0 = no outlines
    ink: RGB = (20, 20, 20)
    pixel: int = 1  # > 1: draw at size // pixel, posterize, upscale with nearest neighbour
    blur: float = 0.0  # blur radius as a fraction of the frame
    grain: float = 0.0  # paper texture strength
    glow: float = 0.0  # halo around characters and props
    hatch: bool = False  # pencil hatching instead of solid fills
    stars: bool = False  # a starry sky


@dataclass(frozen=True)
class Scene:
    name: str  # the one word captions use for the place
    at: str  # "in" the forest, "on" the beach
    adjectives: tuple[str, ...]
    sky: RGB
    ground: RGB
    horizon: float  # fraction of the frame height
    spot: str  # where things are found here
    sight: str  # what one looks at here (drawn in the background)


@dataclass(frozen=True)
class Prop:
    name: str
    use: str  # what it is used for, after "to"

    @property
    def article(self) -> str:
        return "an" if self.name[0] in "aeiou" else "a"


# Shape, colour and accessory are each unique, so identity is recoverable from any one of them.
CHARACTERS: tuple[Character, ...] = (
    Character("Mira", "she", "round", "red", (226, 52, 48), "hat", "yellow", (250, 210, 40)),
    Character("Bo", "he", "square", "blue", (44, 96, 228), "scarf", "white", (250, 250, 250)),
    Character("Tiko", "they", "triangle", "green", (52, 176, 72), "glasses", "black", (15, 15, 15)),
    Character("Luna", "she", "oval", "purple", (150, 72, 210), "bow", "pink", (255, 130, 200)),
    Character("Rex", "he", "star", "orange", (250, 140, 26), "crown", "gold", (255, 215, 0)),
    Character("Pip", "they", "diamond", "yellow", (244, 214, 36), "backpack", "brown", (120, 72, 36)),
    Character("Nell", "she", "heart", "pink", (246, 112, 172), "cape", "blue", (40, 60, 170)),
    Character("Oskar", "he", "pear", "teal", (24, 178, 170), "antenna", "silver", (200, 204, 220)),
)

STYLES: tuple[Style, ...] = (
    Style("flat", "plain vivid fills, no outlines"),
    Style("outline", "thick black outlines, light fills", fill_mix=0.35, scene_mix=0.45, outline=0.035),
    Style(
        "watercolor",
        "soft blurred washes on textured paper",
        fill_mix=0.1,
        scene_mix=0.5,
        wash=(246, 238, 220),
        blur=0.014,
        grain=0.10,
    ),
    Style("pixel", "chunky pixels, few colours", pixel=3),
    Style("night", "dark night scene, glowing characters", scene_mix=0.72, wash=(12, 16, 48), glow=0.9, stars=True),
    Style(
        "sketch",
        "pencil hatching on white paper",
        scene_mix=0.7,
        wash=(250, 248, 240),
        outline=0.018,
        ink=(70, 70, 80),
        hatch=True,
    ),
)

SCENES: tuple[Scene, ...] = (
    Scene(
        "forest", "in", ("quiet", "green"), (170, 215, 240), (70, 140, 60), 0.60, "under an old tree", "the tall trees"
    ),
    Scene(
        "beach", "on", ("sunny", "warm"), (150, 205, 245), (236, 210, 150), 0.55, "in the warm sand", "the blue waves"
    ),
    Scene(
        "castle", "in", ("old", "grand"), (190, 200, 232), (110, 150, 90), 0.62, "near the big gate", "the high towers"
    ),
    Scene(
        "city",
        "in",
        ("busy", "noisy"),
        (205, 222, 240),
        (120, 120, 126),
        0.66,
        "beside a little shop",
        "the tall houses",
    ),
    Scene(
        "mountain",
        "on",
        ("snowy", "cold"),
        (185, 215, 245),
        (244, 247, 255),
        0.62,
        "in the deep snow",
        "the white peaks",
    ),
    Scene(
        "desert", "in", ("dry", "hot"), (250, 222, 160), (226, 180, 100), 0.62, "behind a tall cactus", "the hot sun"
    ),
    Scene(
        "meadow",
        "in",
        ("sunny", "flowery"),
        (160, 220, 250),
        (120, 200, 80),
        0.60,
        "in the tall grass",
        "the bright flowers",
    ),
    Scene("cave", "in", ("dark", "deep"), (74, 54, 44), (104, 84, 64), 0.62, "on a cold rock", "the shining crystals"),
)

PROPS: tuple[Prop, ...] = (
    Prop("key", "open a small locked door"),
    Prop("lantern", "light up the dark path"),
    Prop("map", "find the right way"),
    Prop("ball", "play a bouncy game"),
    Prop("flower", "bring a smile to everyone"),
    Prop("shell", "listen to the sound of the sea"),
    Prop("book", "read an old story"),
    Prop("bell", "ring a cheerful tune"),
)

_CHARACTER = MappingProxyType({c.name: c for c in CHARACTERS})
_STYLE = MappingProxyType({s.name: s for s in STYLES})
_SCENE = MappingProxyType({s.name: s for s in SCENES})
_PROP = MappingProxyType({p.name: p for p in PROPS})


@dataclass(frozen=True)
class FrameLayout:
    """Where and how the frame is drawn: varies frame to frame so the task is not memorisation."""

    x: float  # protagonist's centre, fraction of the width
    ground: float  # where the protagonist stands, fraction of the height
    scale: float  # protagonist height is about 0.44 * scale of the frame
    pose: str  # stand | walk | jump | wave | sit
    facing: int  # -1 left, +1 right
    friend_side: int  # the companion stands to this side of the protagonist
    shift: float  # horizontal offset of background objects
