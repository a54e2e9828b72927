"""Procedural captioned images for the testbed: coloured shapes on a coloured background.

Every image is 32x32 RGB and fully described by its caption, e.g.
``"a small red circle top left on green"`` or, for two objects,
``"a large blue square top right and a small white triangle bottom left on black"``.
Everything is drawn from a ``torch.Generator``, so the same seed gives the same images.

Held-out split: the (colour, shape, position) triples with ``(3*colour + 5*shape + position) % 8 == 0``
(15 of the 120 triples) never occur in training or in-domain prompts. Each held-out triple's colour,
shape and position are all seen in training, paired differently, so held-out prompts test composition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 32

COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SHAPES = ("circle", "square", "triangle")
# Centres in pixels (x, y); y grows downwards.
POSITIONS = {
    "top left": (8.0, 8.0),
    "top right": (24.0, 8.0),
    "bottom left": (8.0, 24.0),
    "bottom right": (24.0, 24.0),
    "center": (16.0, 16.0),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
# Half-extent range in pixels; a large shape at a corner still fits inside its quadrant.
SIZES = {"small": (4.0, 5.0), "large": (6.5, 7.5)}

COLOR_NAMES = tuple(COLORS)
POSITION_NAMES = tuple(POSITIONS)
SIZE_NAMES = tuple(SIZES)

TWO_OBJECT_PROB = 0.2
_POSITION_JITTER = 1.5
_COLOR_JITTER = 0.04
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str


def is_held_out(obj: ShapeObject) -> bool:
    """True for the (colour, shape, position) triples that training never shows."""
    c = COLOR_NAMES.index(obj.color)
    s = SHAPES.index(obj.shape)
    p = POSITION_NAMES.index(obj.position)
    return (3 * c + 5 * s + p) % 8 == 0


def caption(scene: Scene) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} {o.position}" for o in scene.objects]
    return " and ".join(parts) + f" on {scene.background}"


def parse_caption(text: str) -> Scene:
    """Inverse of `caption`; raises ValueError for text outside the caption grammar."""
    words = text.lower().split()
    objects = []
    i = 0

    def expect(options, what):
        nonlocal i
        if i >= len(words) or words[i] not in options:
            found = words[i] if i < len(words) else "end of text"
            raise ValueError(f"expected {what} at word {i} of {text!r}, found {found!r}")
        i += 1
        return words[i - 1]

    while True:
        expect(("a",), "'a'")
        size = expect(SIZE_NAMES, "a size")
        color = expect(COLOR_NAMES, "a colour")
        shape = expect(SHAPES, "a shape")
        first = expect(("top", "bottom", "center"), "a position")
        position = first if first == "center" else f"{first} {expect(('left', 'right'), 'left/right')}"
        objects.append(ShapeObject(color, shape, position, size))
        if expect(("and", "on"), "'and' or 'on'") == "on":
            break
    background = expect(COLOR_NAMES, "a background colour")
    if i != len(words):
        raise ValueError(f"unexpected trailing words in {text!r}")
    return Scene(tuple(objects), background)


def _pick(options, generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def random_scene(generator: torch.Generator, held_out: bool = False,
                 two_object_prob: float = TWO_OBJECT_PROB) -> Scene:
    """One scene from the training distribution, or (held_out=True) a single object whose
    (colour, shape, position) triple is held out of training."""
    two = not held_out and float(torch.rand((), generator=generator)) < two_object_prob
    # Two objects go to distinct corners so they never overlap.
    positions = list(CORNERS) if two else list(POSITION_NAMES)
    objects = []
    for _ in range(2 if two else 1):
        while True:
            obj = ShapeObject(_pick(COLOR_NAMES, generator), _pick(SHAPES, generator),
                              _pick(positions, generator), _pick(SIZE_NAMES, generator))
            if is_held_out(obj) == held_out and all(o.color != obj.color for o in objects):
                break
        positions.remove(obj.position)
        objects.append(obj)
    used = {o.color for o in objects}
    background = _pick([c for c in COLOR_NAMES if c not in used], generator)
    return Scene(tuple(objects), background)


def _coverage(shape: str, cx: float, cy: float, r: float, xs: torch.Tensor, ys: torch.Tensor):
    """Fraction of each pixel covered by the shape (supersampled anti-aliasing)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    else:  # upright triangle with apex (0, -r) and base corners (+-r, 0.8r)
        inside = (dy <= 0.8 * r) & (dy >= -r + 1.8 * dx.abs())
    k = _SUPERSAMPLE
    return inside.float().view(IMAGE_SIZE, k, IMAGE_SIZE, k).mean(dim=(1, 3))


def render(scenes: list[Scene], generator: torch.Generator) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1]; position, size and colour get small random jitter."""
    k = _SUPERSAMPLE
    grid = (torch.arange(IMAGE_SIZE * k, dtype=torch.float32) + 0.5) / k
    ys, xs = grid[:, None].expand(-1, IMAGE_SIZE * k), grid[None, :].expand(IMAGE_SIZE * k, -1)
    out = torch.empty(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE)

    def jittered_color(name):
        rgb = torch.tensor(COLORS[name]) + (torch.rand(3, generator=generator) * 2 - 1) * _COLOR_JITTER
        return rgb.clamp(0, 1)[:, None, None]

    for n, scene in enumerate(scenes):
        image = jittered_color(scene.background).expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
        for obj in scene.objects:
            cx, cy = POSITIONS[obj.position]
            jx, jy = ((torch.rand(2, generator=generator) * 2 - 1) * _POSITION_JITTER).tolist()
            lo, hi = SIZES[obj.size]
            r = lo + (hi - lo) * float(torch.rand((), generator=generator))
            alpha = _coverage(obj.shape, cx + jx, cy + jy, r, xs, ys)
            image = image * (1 - alpha) + jittered_color(obj.color) * alpha
        out[n] = image
    return out


def training_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n fresh (image, caption) pairs from the training distribution (held-out triples excluded)."""
    scenes = [random_scene(generator) for _ in range(n)]
    return render(scenes, generator), [caption(s) for s in scenes], scenes


def in_domain_prompts(n: int, seed: int = 0) -> list[str]:
    """Captions from the training distribution: the calibration set."""
    g = torch.Generator().manual_seed(seed)
    return [caption(random_scene(g)) for _ in range(n)]


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """Single-object captions built on held-out (colour, shape, position) triples: never in
    training and disjoint from every in-domain prompt."""
    g = torch.Generator().manual_seed(seed)
    return [caption(random_scene(g, held_out=True)) for _ in range(n)]
