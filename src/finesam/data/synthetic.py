"""Synthetic images of thin structures with exact masks, for tests and demos.

Each sample is one object — a wire, a mesh, a ring or a tuft of hair — over a textured background (gradient,
blotches, noise). The mask is drawn first, without antialiasing, and the image is painted from it, so mask and
image agree pixel for pixel: every channel of a background pixel is at most `BACKGROUND_MAX` and the brightest
channel of a foreground pixel is at least `FOREGROUND_MIN`, so `image.max(channels) >= 128` recovers the mask.
"""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finesam.weights.io import atomic_write

KINDS = ("wire", "mesh", "ring", "hair")
BACKGROUND_MAX = 119
FOREGROUND_MIN = 136

Point = tuple[float, float]


def _draw_wire(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """A polyline of 3 to 6 vertices, 1 to 4 pixels thick."""
    count = int(rng.integers(3, 7))
    xs = rng.uniform(0.05, 0.95, count) * width
    ys = rng.uniform(0.05, 0.95, count) * height
    draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255, width=int(rng.integers(1, 5)), joint="curve")


def _draw_mesh(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """A square patch of a rotated grid of 1 or 2 pixel lines."""
    half = rng.uniform(0.2, 0.3) * min(width, height)
    reach = half * math.sqrt(2)  # the rotated patch stays inside this distance of its centre
    cx = rng.uniform(reach, width - reach)
    cy = rng.uniform(reach, height - reach)
    spacing = float(rng.integers(8, 21))
    line_width = int(rng.integers(1, 3))
    angle = rng.uniform(0, math.pi / 2)
    cos, sin = math.cos(angle), math.sin(angle)

    def place(u: float, v: float) -> Point:
        return cx + u * cos - v * sin, cy + u * sin + v * cos

    offsets = np.arange(-math.floor(half / spacing), math.floor(half / spacing) + 1) * spacing
    for offset in offsets.tolist():
        draw.line([place(offset, -half), place(offset, half)], fill=255, width=line_width)
        draw.line([place(-half, offset), place(half, offset)], fill=255, width=line_width)


def _draw_ring(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """An elliptical annulus 2 to 6 pixels thick."""
    rx, ry = rng.uniform(0.15, 0.4, 2) * min(width, height)
    cx, cy = rng.uniform(rx + 1, width - rx - 1), rng.uniform(ry + 1, height - ry - 1)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=255, width=int(rng.integers(2, 7)))


def _bezier(start: np.ndarray, control1: np.ndarray, control2: np.ndarray, end: np.ndarray) -> list[Point]:
    """A cubic Bezier curve as a polyline whose steps are at most about a pixel."""
    length = float(
        np.linalg.norm(control1 - start) + np.linalg.norm(control2 - control1) + np.linalg.norm(end - control2)
    )
    t = np.linspace(0.0, 1.0, max(2, int(length) + 2))[:, None]
    curve = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * control1 + 3 * (1 - t) * t**2 * control2 + t**3 * end
    return [(float(x), float(y)) for x, y in curve]


def _draw_hair(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """3 to 8 smooth strands, 1 or 2 pixels thick, growing from one root."""
    scale = np.array([width, height], dtype=np.float64)
    root = rng.uniform(0.3, 0.7, 2) * scale
    for _ in range(int(rng.integers(3, 9))):
        start = root + rng.normal(0, 0.02, 2) * scale
        end = rng.uniform(0.05, 0.95, 2) * scale
        control1, control2 = (start + (end - start) * f + rng.normal(0, 0.15, 2) * scale for f in (1 / 3, 2 / 3))
        draw.line(_bezier(start, control1, control2, end), fill=255, width=int(rng.integers(1, 3)))


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, np.random.Generator, int, int], None]] = {
    "wire": _draw_wire,
    "mesh": _draw_mesh,
    "ring": _draw_ring,
    "hair": _draw_hair,
}


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) dim texture: a linear gradient between two colours, soft blotches, noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
    colours = rng.uniform(10, 100, (2, 3))
    pixels = colours[0] * (1 - t) + colours[1] * t
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(0.05, 0.2) * min(width, height)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))[..., None]
        pixels += blob * rng.uniform(-30, 30, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return pixels.clip(0, BACKGROUND_MAX)


def _foreground(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) bright colour with some shading and noise; one channel never below `FOREGROUND_MIN`."""
    colour = rng.uniform(30, 240, 3)
    dominant = int(rng.integers(0, 3))
    colour[dominant] = rng.uniform(170, 240)
    shading = np.linspace(-20, 20, width)[None, :, None] * rng.choice([-1.0, 1.0])
    pixels = (colour + shading + rng.normal(0, 10, (height, width, 3))).clip(0, 255)
    pixels[..., dominant] = pixels[..., dominant].clip(FOREGROUND_MIN, 255)
    return pixels


def make_sample(
    seed: int, size: tuple[int, int] = (256, 256), kind: str | None = None
) -> tuple[Image.Image, Image.Image]:
    """A synthetic (RGB image, mask) pair; the mask is mode "L" with values 0 and 255.

    `size` is (width, height) as in PIL, each at least 16. `kind` is one of `KINDS`; None picks
    `KINDS[seed % 4]`. The same seed always gives the same pair (no global random state is used).
    """
    width, height = size
    if width < 16 or height < 16:
        raise ValueError(f"size must be at least 16x16, got {width}x{height}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    kind = KINDS[seed % len(KINDS)] if kind is None else kind
    if kind not in _DRAWERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (width, height), 0)
    _DRAWERS[kind](ImageDraw.Draw(mask), rng, width, height)
    inside = np.asarray(mask)[..., None] > 0
    pixels = np.where(inside, _foreground(rng, width, height), _background(rng, width, height))
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB"), mask


def sample_seed(seed: int, index: int) -> int:
    """The `make_sample` seed of sample `index` of the dataset `seed` (unrelated for nearby seeds or indices)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_dataset(root: Path, count: int, seed: int = 0, size: tuple[int, int] = (256, 256)) -> Path:
    """Writes `count` samples as `root/im/000000.png` and `root/gt/000000.png`, ... and returns `root`.

    Sample i has the kind `KINDS[i % 4]` and the seed `sample_seed(seed, i)`. Images are PNG too (lossless), and
    every file is written atomically. Refuses folders that already hold files, so datasets never mix.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(root)
    for folder in (root / "im", root / "gt"):
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty; write the dataset to a new folder")
    for index in range(count):
        image, mask = make_sample(sample_seed(seed, index), size, KINDS[index % len(KINDS)])
        stem = f"{index:06d}"
        for picture, path in ((image, root / "im" / f"{stem}.png"), (mask, root / "gt" / f"{stem}.png")):
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    return root
