"""A loss curve as a PNG, drawn with Pillow (no plotting library needed for one line)."""

from pathlib import Path

from PIL import Image, ImageDraw

from finesam.weights.io import atomic_write


def plot_loss(steps: list[int], losses: list[float], path: Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Loss against step, with the axes' ranges written in the corners; written atomically."""
    width, height = size
    margin = 40
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    if steps:
        low, high = min(losses), max(losses)
        first, last = steps[0], max(steps[-1], steps[0] + 1)
        span = high - low or 1.0

        def xy(step: int, loss: float) -> tuple[float, float]:
            x = margin + (step - first) / (last - first) * (width - 1.5 * margin)
            y = height - margin - (loss - low) / span * (height - 1.5 * margin)
            return x, y

        points = [xy(s, v) for s, v in zip(steps, losses, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill="blue")
        draw.text((4, margin // 2), f"{high:.4g}", fill="black")
        draw.text((4, height - margin - 10), f"{low:.4g}", fill="black")
        draw.text((margin, height - margin + 6), f"step {first}", fill="black")
        draw.text((width - 6 * margin // 2, height - margin + 6), f"step {steps[-1]}", fill="black")
    draw.text((width // 2 - 30, 4), "training loss", fill="black")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
