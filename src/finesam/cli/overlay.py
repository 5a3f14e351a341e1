"""Drawing masks and prompts over an image: the picture people look at."""

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((30, 144, 255), (255, 99, 71), (60, 179, 113), (238, 130, 238), (255, 215, 0), (0, 206, 209))
GOLDEN_RATIO = (5**0.5 - 1) / 2


def distinct_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` RGB colours, neighbours far apart: the palette, then hues a golden-ratio turn apart."""
    colours = list(PALETTE[:count])
    for i in range(count - len(colours)):
        hue = (0.1 + i * GOLDEN_RATIO) % 1.0
        saturation, value = (0.85, 0.95) if i % 2 == 0 else (0.6, 0.8)
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((round(255 * red), round(255 * green), round(255 * blue)))
    return colours


def overlay(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[tuple[float, float, int]] = (),
    alpha: float = 0.5,
    colours: Sequence[tuple[int, int, int]] | None = None,
    labels: Sequence[str] = (),
) -> Image.Image:
    """The image with each (H, W) boolean mask tinted in its own colour, boxes outlined, points marked.

    Masks take `colours` in turn (by default the palette, repeated). Foreground points are drawn green,
    background points red. `labels` name the boxes in turn (written at their top-left corner).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = colours or PALETTE
    for i, mask in enumerate(masks):
        colour = np.array(palette[i % len(palette)], dtype=np.float32)
        base[mask] = (1 - alpha) * base[mask] + alpha * colour
    result = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(result)
    width = max(2, round(max(result.size) / 400))
    for i, box in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle([tuple(box[:2]), tuple(box[2:4])], outline=colour, width=width)
        if i < len(labels):
            left, top, right, bottom = draw.textbbox((box[0] + width, box[1] + width), labels[i])
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
            draw.text((box[0] + width, box[1] + width), labels[i], fill=(255, 255, 255))
    radius = 3 * width
    for x, y, label in points:
        fill = (0, 200, 0) if label == 1 else (220, 0, 0)
        draw.ellipse([(x - radius, y - radius), (x + radius, y + radius)], fill=fill, outline=(255, 255, 255))
    return result
