"""Synthetic scenes: coloured shapes on a plain background, their ground truth and their rendering.

A scene's objects are the ground truth the rule judge checks facts against; a question refers to objects
through a `Target` (a shape, optionally narrowed by size). The vocabulary here is the whole world the
synthetic data and the rule judge know about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (38, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 25),
    "purple": (135, 55, 175),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("big", "small")
# Half an object's extent in pixels. Each object fills most of one 32-px cell of a layout aligned with the tiny
# model's 64-px tiles (grpo_fast.data.synthetic), so no tile edge cuts it and each tile shows it at full size.
RADIUS = {"big": 14, "small": 9}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclass(frozen=True)
class SceneObject:
    """One shape: `x`, `y` its centre in pixels."""

    shape: str
    colour: str
    size: str
    x: int
    y: int


@dataclass(frozen=True)
class Target:
    """What a question asks about: every object of `shape` (and of `size`, when given)."""

    shape: str
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return obj.shape == self.shape and (self.size is None or obj.size == self.size)

    @property
    def noun(self) -> str:
        """The noun phrase, e.g. "small triangle"."""
        return f"{self.size} {self.shape}" if self.size else self.shape

    def with_colour(self, colour: str) -> str:
        """The noun phrase with a colour, in English adjective order, e.g. "small red triangle"."""
        return f"{self.size} {colour} {self.shape}" if self.size else f"{colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image's ground truth: canvas size in pixels and its objects."""

    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def referents(self, target: Target) -> list[SceneObject]:
        return [o for o in self.objects if target.matches(o)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "objects": [asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(d["width"], d["height"], tuple(d["background"]), tuple(SceneObject(**o) for o in d["objects"]))


def render(scene: Scene) -> Image.Image:
    """Draws the scene as an RGB image of `scene.width x scene.height` pixels."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        r, fill = RADIUS[o.size], COLOURS[o.colour]
        box = (o.x - r, o.y - r, o.x + r, o.y + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.x, o.y - r), (o.x + r, o.y + r), (o.x - r, o.y + r)], fill=fill)
        else:  # diamond
            draw.polygon([(o.x, o.y - r), (o.x + r, o.y), (o.x, o.y + r), (o.x - r, o.y)], fill=fill)
    return image
