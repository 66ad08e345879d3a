"""Drawing for StoryStream-mini (storyworld.py): scenes, characters, props and art styles, with PIL and numpy.

Everything is drawn in unit coordinates (0..1 of the frame) on a canvas twice the requested size and
box-filtered down, which anti-aliases cheaply; a 64 px frame costs about a millisecond. Styles are parameters
of one pipeline (fills -> outlines -> glow -> blur/grain -> hatching -> pixelation) rather than separate
renderers, so every style shows the same characters in the same places and only the look changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from labkit.data.catalogue import Character, FrameLayout, Scene, Style

RGB = tuple[int, int, int]
Points = tuple[tuple[float, float], ...]
LIMB: RGB = (52, 44, 44)

# ---------------------------------------------------------------------------------------------------------
# Body shapes: polygons in a unit box (x in [-0.5, 0.5], y in [0, 1] from the top).


def _normalise(points: Sequence[tuple[float, float]]) -> Points:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, w, y0, h = (min(xs) + max(xs)) / 2, max(xs) - min(xs), min(ys), max(ys) - min(ys)
    return tuple(((x - cx) / w, (y - y0) / h) for x, y in points)


def _superellipse(n: float, k: int = 48) -> Points:
    # n = 2 is an ellipse, larger n a rounded box, n = 1 a diamond
    ring = [(math.cos(2 * math.pi * j / k), math.sin(2 * math.pi * j / k)) for j in range(k)]
    return _normalise([(math.copysign(abs(c) ** (2 / n), c), math.copysign(abs(s) ** (2 / n), s)) for c, s in ring])


def _star(k: int = 5) -> Points:
    return _normalise(
        [
            (
                (0.5 if j % 2 == 0 else 0.22) * math.sin(math.pi * j / k),
                -(0.5 if j % 2 == 0 else 0.22) * math.cos(math.pi * j / k),
            )
            for j in range(2 * k)
        ]
    )


def _heart(k: int = 40) -> Points:
    ts = [2 * math.pi * j / k for j in range(k)]
    return _normalise(
        [
            (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts
        ]
    )


def _pear(k: int = 24) -> Points:
    # a small head circle on a big belly circle, traced down the right side and up the left
    def half(y: float) -> float:
        head = 0.2**2 - (y - 0.2) ** 2
        belly = 0.3**2 - (y - 0.7) ** 2
        return max(math.sqrt(max(head, 0.0)) * 1.25, math.sqrt(max(belly, 0.0)) * 1.2)

    ys = [j / k for j in range(k + 1)]
    right = [(half(y), y) for y in ys]
    return _normalise(right + [(-x, y) for x, y in reversed(right)])


@dataclass(frozen=True)
class _Body:
    points: Points
    aspect: float  # width / height
    eye_y: float  # eye height, fraction of body height from the top
    eye_dx: float  # eye distance from the centre, fraction of body height
    neck_y: float  # where a scarf or cape sits


_BODIES = MappingProxyType(
    {
        "round": _Body(_superellipse(2), 1.0, 0.38, 0.17, 0.64),
        "square": _Body(_superellipse(6), 0.95, 0.34, 0.18, 0.62),
        "triangle": _Body(((0.0, 0.0), (0.5, 1.0), (-0.5, 1.0)), 1.1, 0.62, 0.12, 0.8),
        "oval": _Body(_superellipse(2), 0.6, 0.3, 0.12, 0.6),
        "star": _Body(_star(), 1.05, 0.48, 0.1, 0.62),
        "diamond": _Body(((0.0, 0.0), (0.5, 0.5), (0.0, 1.0), (-0.5, 0.5)), 0.8, 0.42, 0.12, 0.62),
        "heart": _Body(_heart(), 1.05, 0.36, 0.17, 0.62),
        "pear": _Body(_pear(), 0.8, 0.2, 0.1, 0.42),
    }
)


def _half_width(points: Points, y: float) -> float:
    """Half the width of a polygon at height y (same unit box), so scarves and arms fit every shape."""
    best = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        if (y0 - y) * (y1 - y) <= 0 and y0 != y1:
            best = max(best, abs(x0 + (x1 - x0) * (y - y0) / (y1 - y0)))
    return best


# ---------------------------------------------------------------------------------------------------------
# A pen in unit coordinates, with a style's colour wash and outlines.


def _mix(rgb: RGB, toward: RGB, amount: float) -> RGB:
    return tuple(round(a + (b - a) * amount) for a, b in zip(rgb, toward))  # type: ignore[return-value]


class _Pen:
    def __init__(self, image: Image.Image, style: "Style", mix: float, outline: float):
        self.d, self.s = ImageDraw.Draw(image), image.size[0]
        self.style, self.mix = style, mix
        self.width = max(1, round(outline * self.s)) if outline > 0 else 0

    def c(self, rgb: RGB) -> RGB:
        return _mix(rgb, self.style.wash, self.mix)

    def _ink(self, edge: bool) -> dict:
        return dict(outline=self.style.ink, width=self.width) if edge and self.width else {}

    def poly(self, pts: Sequence[tuple[float, float]], rgb: RGB, edge: bool = True) -> None:
        self.d.polygon([(x * self.s, y * self.s) for x, y in pts], fill=self.c(rgb), **self._ink(edge))

    def rect(self, x0: float, y0: float, x1: float, y1: float, rgb: RGB, edge: bool = True) -> None:
        s = self.s
        self.d.rectangle((x0 * s, y0 * s, max(x0, x1) * s, max(y0, y1) * s), fill=self.c(rgb), **self._ink(edge))

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, rgb: RGB, edge: bool = True, raw: bool = False
    ) -> None:
        s = self.s
        fill = rgb if raw else self.c(rgb)
        self.d.ellipse(((cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s), fill=fill, **self._ink(edge))

    def line(self, pts: Sequence[tuple[float, float]], rgb: RGB, width: float) -> None:
        w = max(1, round(width * self.s))
        self.d.line([(x * self.s, y * self.s) for x, y in pts], fill=self.c(rgb), width=w, joint="curve")

    def arc(self, cx: float, cy: float, r: float, start: float, end: float, rgb: RGB, width: float) -> None:
        s = self.s
        self.d.arc(
            ((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s),
            start,
            end,
            fill=self.c(rgb),
            width=max(1, round(width * s)),
        )


# ---------------------------------------------------------------------------------------------------------
# Scenes: sky, ground and a few big recognisable objects; `shift` slides the objects between frames.


def _forest(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    for x in (0.15, 0.5, 0.85):
        p.ellipse(x + sh, hz, 0.3, 0.1, (60, 120, 60), edge=False)
    for x, h in ((0.06, 0.42), (0.32, 0.36), (0.62, 0.44), (0.9, 0.38)):
        x += sh
        p.rect(x - 0.025, hz - 0.1, x + 0.025, hz + 0.06, (110, 70, 40))
        p.poly(((x, hz - h), (x + 0.12, hz - 0.08), (x - 0.12, hz - 0.08)), (30, 110, 50))
        p.poly(((x, hz - h - 0.08), (x + 0.09, hz - h + 0.12), (x - 0.09, hz - h + 0.12)), (40, 130, 60))


def _beach(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    p.ellipse(0.78 + sh, 0.16, 0.09, 0.09, (255, 220, 60))
    p.rect(0, hz - 0.14, 1, hz + 0.02, (40, 120, 205), edge=False)
    for x in (0.1, 0.45, 0.8):
        p.arc(x + sh, hz - 0.06, 0.06, 200, 340, (235, 245, 255), 0.012)
    p.line(((0.12 + sh, hz + 0.22), (0.2 + sh, hz - 0.02)), (120, 80, 40), 0.018)  # a beach umbrella
    p.poly(((0.04 + sh, 0.5), (0.2 + sh, 0.36), (0.36 + sh, 0.5)), (230, 70, 60))


def _castle(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz, grey = sc.horizon, (150, 150, 162)
    p.rect(0.2 + sh, hz - 0.26, 0.8 + sh, hz + 0.04, grey)
    for x in (0.12, 0.74):
        x += sh
        p.rect(x, hz - 0.44, x + 0.14, hz + 0.04, (135, 135, 150))
        for k in range(3):
            p.rect(x + k * 0.05, hz - 0.49, x + k * 0.05 + 0.035, hz - 0.44, (135, 135, 150))
    p.poly(((0.81 + sh, 0.14), (0.81 + sh, 0.04), (0.9 + sh, 0.09)), (220, 50, 50))
    p.line(((0.81 + sh, 0.18), (0.81 + sh, 0.04)), (80, 60, 50), 0.01)
    p.ellipse(0.5 + sh, hz - 0.06, 0.07, 0.09, (70, 50, 40))
    p.rect(0.43 + sh, hz - 0.06, 0.57 + sh, hz + 0.04, (70, 50, 40), edge=False)


def _city(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    for x, w, h, rgb in (
        (-0.05, 0.22, 0.42, (180, 90, 70)),
        (0.2, 0.18, 0.55, (120, 130, 160)),
        (0.41, 0.2, 0.36, (210, 170, 110)),
        (0.64, 0.16, 0.5, (150, 110, 150)),
        (0.83, 0.24, 0.4, (110, 150, 140)),
    ):
        x += sh
        p.rect(x, hz - h, x + w, hz, rgb)
        for row in range(int(h / 0.12)):
            for col in (0.25, 0.62):
                wx, wy = x + col * w, hz - h + 0.05 + row * 0.12
                p.rect(wx, wy, wx + 0.045, wy + 0.05, (255, 225, 110), edge=False)
    p.rect(0, hz + 0.12, 1, hz + 0.14, (240, 240, 240), edge=False)


def _mountain(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    for x, h, w in ((0.2, 0.45, 0.3), (0.62, 0.55, 0.36), (0.98, 0.4, 0.28)):
        x += sh
        p.poly(((x, hz - h), (x + w, hz + 0.01), (x - w, hz + 0.01)), (112, 122, 146))
        p.poly(
            ((x, hz - h), (x + w * 0.32, hz - h * 0.68), (x, hz - h * 0.6), (x - w * 0.32, hz - h * 0.68)),
            (255, 255, 255),
        )
    for _ in range(10):
        x, y = rnd.uniform(0, 1), rnd.uniform(0, hz)
        p.ellipse(x, y, 0.01, 0.01, (255, 255, 255), edge=False)


def _desert(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    p.ellipse(0.22 + sh, 0.18, 0.11, 0.11, (255, 240, 120))
    p.ellipse(0.7 + sh, hz + 0.04, 0.45, 0.12, (236, 196, 120), edge=False)
    for x, h in ((0.12, 0.3), (0.82, 0.24)):
        x += sh
        p.rect(x - 0.03, hz - h, x + 0.03, hz + 0.04, (60, 150, 70))
        p.rect(x - 0.1, hz - h * 0.7, x - 0.03, hz - h * 0.55, (60, 150, 70))
        p.rect(x - 0.1, hz - h * 0.95, x - 0.065, hz - h * 0.55, (60, 150, 70))
        p.rect(x + 0.03, hz - h * 0.5, x + 0.09, hz - h * 0.36, (60, 150, 70))
        p.rect(x + 0.055, hz - h * 0.8, x + 0.09, hz - h * 0.36, (60, 150, 70))


def _meadow(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    p.ellipse(0.25 + sh, hz + 0.02, 0.35, 0.14, (150, 215, 100), edge=False)
    p.ellipse(0.8 + sh, hz + 0.03, 0.3, 0.11, (140, 205, 90), edge=False)
    for x in (0.6, 0.68, 0.76):
        p.ellipse(x + sh, 0.16, 0.07, 0.05, (255, 255, 255), edge=False)
    for _ in range(12):
        x, y = rnd.uniform(0.02, 0.98), rnd.uniform(hz + 0.05, 0.98)
        p.ellipse(
            x, y, 0.016, 0.016, ((250, 250, 250), (240, 70, 80), (250, 220, 50))[int(rnd.integers(3))], edge=False
        )


def _cave(p: _Pen, sc: "Scene", sh: float, rnd: np.random.Generator) -> None:
    hz = sc.horizon
    p.ellipse(0.5 + sh, hz - 0.15, 0.42, 0.32, (48, 34, 28), edge=False)  # the dark mouth of the tunnel
    for x in (0.05, 0.2, 0.37, 0.55, 0.72, 0.9):
        x += sh
        p.poly(((x - 0.06, 0.0), (x + 0.06, 0.0), (x, 0.22)), (56, 40, 32))
    for x, y in ((0.12, hz - 0.02), (0.86, hz)):
        x += sh
        p.poly(((x, y - 0.14), (x + 0.04, y), (x - 0.04, y)), (90, 230, 230))
        p.poly(((x + 0.05, y - 0.09), (x + 0.08, y), (x + 0.02, y)), (160, 120, 240))


_SCENE_DRAW: MappingProxyType[str, Callable] = MappingProxyType(
    {
        "forest": _forest,
        "beach": _beach,
        "castle": _castle,
        "city": _city,
        "mountain": _mountain,
        "desert": _desert,
        "meadow": _meadow,
        "cave": _cave,
    }
)


# ---------------------------------------------------------------------------------------------------------
# Characters and props


def _character(p: _Pen, ch: "Character", cx: float, ground: float, height: float, pose: str, facing: int) -> None:
    body = _BODIES[ch.shape]
    u = height / 1.22  # body height; legs take the rest
    w = u * body.aspect
    legs = 0.0 if pose == "sit" else 0.22 * u
    bottom = ground - legs - (0.2 * u if pose == "jump" else 0.0)
    top = bottom - u
    back = -facing
    neck_y, neck_hw = top + body.neck_y * u, _half_width(body.points, body.neck_y) * w
    if ch.accessory == "cape":  # behind the body, blowing out behind
        p.poly(
            (
                (cx - neck_hw * 0.8, neck_y - 0.12 * u),
                (cx + neck_hw * 0.8, neck_y - 0.12 * u),
                (cx + back * (neck_hw + 0.42 * u), bottom + 0.04 * u),
                (cx - back * neck_hw * 0.7, bottom + 0.04 * u),
            ),
            ch.accessory_rgb,
        )
    if ch.accessory == "backpack":
        bx = cx + back * (_half_width(body.points, 0.55) * w + 0.05 * u)
        p.rect(bx - 0.18 * u, top + 0.3 * u, bx + 0.18 * u, top + 0.86 * u, ch.accessory_rgb)
    if pose != "sit":
        spread = 0.1 * u if pose in ("walk", "jump") else 0.0
        for side in (-1, 1):
            foot = (cx + side * (0.14 * u + spread), bottom + legs)
            p.line(((cx + side * 0.13 * u, bottom - 0.1 * u), foot), LIMB, 0.07 * u)
            p.ellipse(foot[0] + facing * 0.03 * u, foot[1], 0.07 * u, 0.035 * u, LIMB, edge=False)
    arm_y, arm_hw = top + 0.58 * u, _half_width(body.points, 0.58) * w
    for side in (-1, 1):
        up = pose == "jump" or (pose == "wave" and side == facing)
        hand = (cx + side * (arm_hw + 0.2 * u), top + (0.12 * u if up else 0.86 * u))
        p.line(((cx + side * arm_hw * 0.8, arm_y), hand), LIMB, 0.06 * u)
    p.poly([(cx + x * w, top + y * u) for x, y in body.points], ch.rgb)
    ey, look = top + body.eye_y * u, facing * 0.03 * u
    for side in (-1, 1):
        ex = cx + side * body.eye_dx * u + look
        p.ellipse(ex, ey, 0.085 * u, 0.095 * u, (255, 255, 255), edge=False)
        p.ellipse(ex + look, ey + 0.01 * u, 0.045 * u, 0.05 * u, (15, 15, 15), edge=False)
        if ch.accessory == "glasses":
            p.arc(ex, ey, 0.14 * u, 0, 360, ch.accessory_rgb, 0.06 * u)
    if ch.accessory == "glasses":
        p.line(
            ((cx - body.eye_dx * u + 0.13 * u + look, ey), (cx + body.eye_dx * u - 0.13 * u + look, ey)),
            ch.accessory_rgb,
            0.04 * u,
        )
    p.arc(cx + look, ey + 0.1 * u, 0.08 * u, 30, 150, LIMB, 0.035 * u)
    _accessory(p, ch, cx, top, u, facing, neck_y, neck_hw)


def _accessory(
    p: _Pen, ch: "Character", cx: float, top: float, u: float, facing: int, neck_y: float, neck_hw: float
) -> None:
    kind, rgb = ch.accessory, ch.accessory_rgb
    if kind == "hat":
        p.rect(cx - 0.19 * u, top - 0.34 * u, cx + 0.19 * u, top - 0.02 * u, rgb)
        p.rect(cx - 0.19 * u, top - 0.1 * u, cx + 0.19 * u, top - 0.03 * u, (40, 40, 40), edge=False)
        p.rect(cx - 0.32 * u, top - 0.04 * u, cx + 0.32 * u, top + 0.04 * u, rgb)
    elif kind == "crown":
        p.poly(
            [
                (cx + dx * u, top + dy * u)
                for dx, dy in (
                    (-0.25, 0.05),
                    (-0.25, -0.24),
                    (-0.12, -0.1),
                    (0, -0.3),
                    (0.12, -0.1),
                    (0.25, -0.24),
                    (0.25, 0.05),
                )
            ],
            rgb,
        )
    elif kind == "bow":
        for side in (-1, 1):
            p.poly(
                ((cx, top - 0.02 * u), (cx + side * 0.28 * u, top - 0.2 * u), (cx + side * 0.28 * u, top + 0.12 * u)),
                rgb,
            )
        p.ellipse(cx, top - 0.03 * u, 0.07 * u, 0.07 * u, rgb)
    elif kind == "scarf":
        p.rect(cx - neck_hw - 0.03 * u, neck_y - 0.08 * u, cx + neck_hw + 0.03 * u, neck_y + 0.07 * u, rgb)
        tail = cx - facing * neck_hw * 0.55
        p.rect(tail - 0.07 * u, neck_y, tail + 0.07 * u, neck_y + 0.34 * u, rgb)
    elif kind == "backpack":  # the straps, in front
        p.line(
            ((cx - facing * neck_hw * 0.5, top + 0.3 * u), (cx - facing * neck_hw * 0.5, top + 0.8 * u)), rgb, 0.07 * u
        )
    elif kind == "antenna":
        tip = (cx + facing * 0.1 * u, top - 0.34 * u)
        p.line(((cx, top + 0.04 * u), tip), rgb, 0.05 * u)
        p.ellipse(tip[0], tip[1], 0.09 * u, 0.09 * u, rgb)


def _prop(p: _Pen, name: str, cx: float, cy: float, r: float) -> None:
    if name == "key":
        p.rect(cx - 0.1 * r, cy - 0.15 * r, cx + r, cy + 0.15 * r, (235, 185, 30))
        p.rect(cx + 0.55 * r, cy, cx + 0.75 * r, cy + 0.5 * r, (235, 185, 30), edge=False)
        p.ellipse(cx - 0.45 * r, cy, 0.45 * r, 0.45 * r, (235, 185, 30))
    elif name == "lantern":
        p.arc(cx, cy - 0.6 * r, 0.35 * r, 180, 360, (60, 60, 60), 0.12 * r)
        p.rect(cx - 0.5 * r, cy - 0.6 * r, cx + 0.5 * r, cy + 0.8 * r, (255, 226, 90))
        p.rect(cx - 0.6 * r, cy - 0.75 * r, cx + 0.6 * r, cy - 0.55 * r, (60, 60, 60))
    elif name == "map":
        p.rect(cx - 0.9 * r, cy - 0.65 * r, cx + 0.9 * r, cy + 0.65 * r, (236, 214, 160))
        p.line(((cx - 0.35 * r, cy - 0.35 * r), (cx + 0.35 * r, cy + 0.35 * r)), (210, 40, 40), 0.16 * r)
        p.line(((cx - 0.35 * r, cy + 0.35 * r), (cx + 0.35 * r, cy - 0.35 * r)), (210, 40, 40), 0.16 * r)
    elif name == "ball":
        p.ellipse(cx, cy, 0.75 * r, 0.75 * r, (40, 110, 240))
        p.d.pieslice(
            ((cx - 0.75 * r) * p.s, (cy - 0.75 * r) * p.s, (cx + 0.75 * r) * p.s, (cy + 0.75 * r) * p.s),
            180,
            360,
            fill=p.c((240, 50, 50)),
        )
    elif name == "flower":
        p.line(((cx, cy + r), (cx, cy)), (40, 150, 50), 0.15 * r)
        for k in range(5):
            a = 2 * math.pi * k / 5
            p.ellipse(
                cx + 0.38 * r * math.sin(a),
                cy - 0.3 * r - 0.38 * r * math.cos(a),
                0.26 * r,
                0.26 * r,
                (250, 250, 255),
                edge=False,
            )
        p.ellipse(cx, cy - 0.3 * r, 0.2 * r, 0.2 * r, (250, 200, 30), edge=False)
    elif name == "shell":
        p.d.pieslice(
            ((cx - 0.8 * r) * p.s, (cy - 0.6 * r) * p.s, (cx + 0.8 * r) * p.s, (cy + r) * p.s),
            180,
            360,
            fill=p.c((250, 170, 150)),
            **p._ink(True),
        )
        for dx in (-0.4, 0.0, 0.4):
            p.line(((cx, cy + 0.2 * r), (cx + dx * r, cy - 0.5 * r)), (200, 110, 100), 0.08 * r)
    elif name == "book":
        p.rect(cx - 0.7 * r, cy - 0.8 * r, cx + 0.7 * r, cy + 0.8 * r, (60, 80, 200))
        p.rect(cx + 0.45 * r, cy - 0.7 * r, cx + 0.65 * r, cy + 0.7 * r, (250, 250, 250), edge=False)
    elif name == "bell":
        p.poly(
            (
                (cx - 0.35 * r, cy - 0.6 * r),
                (cx + 0.35 * r, cy - 0.6 * r),
                (cx + 0.8 * r, cy + 0.5 * r),
                (cx - 0.8 * r, cy + 0.5 * r),
            ),
            (240, 190, 40),
        )
        p.ellipse(cx, cy + 0.65 * r, 0.2 * r, 0.2 * r, (140, 90, 20), edge=False)


# ---------------------------------------------------------------------------------------------------------
# One frame


def compose(
    size: int,
    style: "Style",
    scene: "Scene",
    hero: "Character",
    friends: Sequence["Character"],
    props: Sequence[str],
    layout: "FrameLayout",
    wave_friend: bool = False,
    seed: tuple[int, int] = (0, 0),
) -> Image.Image:
    """Draw one frame: scene, companions, props and the protagonist, then the style's finishing passes."""
    rnd = np.random.default_rng([int(v) % 2**63 for v in seed])
    s = max(16, size // style.pixel) if style.pixel > 1 else (2 * size if size <= 512 else size)
    bg = Image.new("RGB", (s, s), _mix(scene.sky, style.wash, style.scene_mix))
    fg = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    back = _Pen(bg, style, style.scene_mix, style.outline * 0.6)
    front = _Pen(fg, style, style.fill_mix, style.outline)
    small = _Pen(fg, style, style.fill_mix, style.outline * 0.6)  # thick lines would swamp small things
    back.rect(0, scene.horizon, 1, 1, scene.ground, edge=False)
    if style.stars and scene.name != "cave":  # caves have no sky
        back.ellipse(0.12, 0.1, 0.05, 0.05, (250, 250, 215), edge=False, raw=True)
        for _ in range(14):
            back.ellipse(
                rnd.uniform(0, 1),
                rnd.uniform(0, scene.horizon * 0.8),
                0.011,
                0.011,
                (255, 255, 230),
                edge=False,
                raw=True,
            )
    _SCENE_DRAW[scene.name](back, scene, layout.shift, rnd)

    shadow = _mix(scene.ground, (0, 0, 0), 0.3)
    height = 0.44 * layout.scale
    for k, friend in enumerate(friends):  # companions are smaller and stand a little behind
        fx = min(0.88, max(0.12, layout.x + layout.friend_side * (0.34 + 0.1 * k)))
        fg_y = layout.ground - 0.03
        back.ellipse(fx, fg_y, 0.1, 0.02, shadow, edge=False)
        _character(small, friend, fx, fg_y, 0.3, "wave" if wave_friend else "stand", -layout.friend_side)
    back.ellipse(layout.x, layout.ground, 0.16 * layout.scale, 0.025, shadow, edge=False)
    r, side = 0.055, -layout.friend_side
    for k, name in enumerate(props):  # what was found stays at the protagonist's feet, newest nearest
        row, col = divmod(len(props) - 1 - k, 3)
        px = layout.x + side * (0.16 * layout.scale + r + col * 2.2 * r)
        _prop(small, name, min(1 - r, max(r, px)), layout.ground - r - row * 2.2 * r, r)
    _character(front, hero, layout.x, layout.ground, height, layout.pose, layout.facing)
    return _finish(bg, fg, size, style, rnd)


def _finish(bg: Image.Image, fg: Image.Image, size: int, style: "Style", rnd: np.random.Generator) -> Image.Image:
    if style.pixel == 1 and bg.size[0] != size:
        bg, fg = bg.resize((size, size), Image.BOX), fg.resize((size, size), Image.BOX)
    base = np.asarray(bg, dtype=np.float32)
    layer = np.asarray(fg, dtype=np.float32)
    alpha = layer[..., 3:] / 255.0
    if style.glow:  # light spilling from the characters onto the dark scene
        lit = Image.fromarray((layer[..., :3] * alpha).astype(np.uint8))
        halo = np.asarray(lit.filter(ImageFilter.GaussianBlur(0.05 * bg.size[0])), dtype=np.float32)
        base = base + style.glow * halo
    out = base * (1 - alpha) + layer[..., :3] * alpha
    n = out.shape[0]
    if style.blur:
        out = np.asarray(
            Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(style.blur * n)),
            dtype=np.float32,
        )
    if style.grain:  # blotchy washes plus fine paper tooth
        blotch = Image.fromarray(rnd.normal(0, 1, (6, 6)).astype(np.float32), mode="F").resize((n, n), Image.BILINEAR)
        texture = 0.7 * np.asarray(blotch)[..., None] + 0.3 * rnd.normal(0, 1, (n, n, 1))
        out = out * (1 + style.grain * texture)
    if style.hatch:  # diagonal pencil strokes: colour only on the strokes, pencil lines kept solid
        yy, xx = np.mgrid[0:n, 0:n]
        stroke = (((xx + yy) // max(1, n // 32)) % 2 == 0)[..., None]
        wash = np.array(style.wash, dtype=np.float32)
        ink = np.abs(out - np.array(style.ink, dtype=np.float32)).sum(-1, keepdims=True) < 90
        out = np.where(ink, out, wash + (out - wash) * np.where(stroke, 1.0, 0.2))
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if style.pixel > 1:  # few colours, big square pixels
        levels = np.round(np.asarray(image, dtype=np.float32) / 51) * 51  # 6 levels a channel
        image = Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return image
