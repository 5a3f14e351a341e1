"""The project's own example image, drawn in code so that it may ship with the project."""

from PIL import Image, ImageDraw

EXAMPLE_SIZE = (960, 640)  # width, height: landscape, not square, to exercise the resize and padding
HOUSE_BOX = (300, 250, 620, 560)  # x1, y1, x2, y2 of the house, the demo's box prompt
SUN_POINT = (810, 120)  # a foreground click on the sun


def example_image() -> Image.Image:
    """A small landscape: sky, hill, a house with a roof, door and windows, a tree and a sun."""
    width, height = EXAMPLE_SIZE
    image = Image.new("RGB", EXAMPLE_SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(height):  # sky gradient
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(150 + 70 * t), 235))
    draw.ellipse([(-200, 420), (width + 200, 1000)], fill=(86, 150, 70))
    draw.ellipse([(760, 70), (860, 170)], fill=(250, 210, 60))
    x1, y1, x2, y2 = HOUSE_BOX
    draw.rectangle([(x1 + 20, y1 + 110), (x2 - 20, y2)], fill=(196, 90, 60))
    draw.polygon([(x1, y1 + 120), ((x1 + x2) // 2, y1), (x2, y1 + 120)], fill=(110, 50, 45))
    draw.rectangle([(440, 430), (490, y2)], fill=(90, 60, 40))
    for wx in (350, 530):
        draw.rectangle([(wx, 400), (wx + 50, 450)], fill=(220, 235, 250))
    draw.rectangle([(120, 380), (145, 540)], fill=(100, 70, 40))
    draw.ellipse([(60, 260), (205, 410)], fill=(40, 110, 50))
    return image
