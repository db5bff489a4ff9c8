"""Example images and questions for the web demo, in several of PALO's ten languages.

The images are small drawings made with PIL (:func:`draw_example_images`), shipped in the repository's ``images/``
folder; the web server redraws any that are missing. An installed package has no such folder (and its install tree
may be read-only): there they are drawn into the user's cache (:func:`examples_dir`).
"""

from __future__ import annotations

import os

from PIL import Image, ImageDraw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES_DIR = os.path.join(REPO_ROOT, "images")


def examples_dir() -> str:
    """The checkout's ``images/`` when this is a checkout, else ``$XDG_CACHE_HOME/palo/images`` (``~/.cache``):
    an installed package's folder above ``palo/`` is ``site-packages``, which is not ours to write in."""
    if os.path.isfile(os.path.join(REPO_ROOT, "pyproject.toml")) and os.path.isdir(IMAGES_DIR):
        return IMAGES_DIR
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "palo", "images")


def _fruits() -> Image.Image:
    image = Image.new("RGB", (240, 180), (250, 246, 235))
    draw = ImageDraw.Draw(image)
    draw.pieslice((30, 70, 210, 200), 0, 180, fill=(150, 100, 60))  # bowl
    draw.ellipse((50, 60, 110, 120), fill=(220, 40, 40))  # apple
    draw.line((80, 60, 86, 48), fill=(90, 60, 20), width=3)
    draw.ellipse((100, 50, 160, 110), fill=(245, 150, 30))  # orange
    draw.ellipse((145, 70, 195, 120), fill=(120, 190, 60))  # lime
    draw.arc((60, 20, 190, 110), 200, 300, fill=(240, 210, 40), width=12)  # banana
    return image


def _fridge() -> Image.Image:
    image = Image.new("RGB", (180, 240), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 10, 160, 230), fill=(250, 250, 250), outline=(120, 120, 130), width=3)
    for y in (80, 150):
        draw.line((22, y, 158, y), fill=(170, 170, 180), width=2)
    draw.ellipse((35, 40, 70, 75), fill=(245, 150, 30))  # orange
    draw.ellipse((80, 45, 110, 75), fill=(220, 30, 40))  # strawberry
    draw.polygon([(120, 75), (150, 75), (135, 30)], fill=(60, 160, 60))  # broccoli-ish
    draw.rectangle((35, 100, 65, 145), fill=(255, 255, 255), outline=(60, 90, 200), width=2)  # milk
    draw.ellipse((80, 110, 120, 145), fill=(240, 220, 60))  # lemon
    draw.rectangle((40, 165, 140, 220), fill=(200, 80, 60))  # red peppers box
    return image


def _street() -> Image.Image:
    image = Image.new("RGB", (240, 180), (150, 200, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 130, 240, 180), fill=(90, 90, 90))  # road
    draw.ellipse((185, 15, 225, 55), fill=(255, 220, 40))  # sun
    draw.rectangle((30, 70, 100, 130), fill=(200, 120, 80))  # house
    draw.polygon([(25, 72), (65, 35), (105, 72)], fill=(150, 40, 40))
    draw.rectangle((55, 100, 75, 130), fill=(90, 50, 30))
    draw.rectangle((150, 95, 160, 130), fill=(110, 70, 30))  # tree
    draw.ellipse((130, 55, 180, 105), fill=(40, 140, 50))
    draw.rectangle((100, 140, 170, 165), fill=(30, 90, 200))  # car
    draw.ellipse((108, 158, 122, 172), fill=(20, 20, 20))
    draw.ellipse((148, 158, 162, 172), fill=(20, 20, 20))
    return image


DRAWINGS = {"fruits.png": _fruits, "fridge.png": _fridge, "street.png": _street}

# (image file, question) pairs; the languages of the PALO paper, right-to-left ones included.
EXAMPLES: list[tuple[str, str]] = [
    ("fridge.png", "इस फ्रिज में कौन सी चीज़ें विटामिन C से भरपूर हैं?"),  # Hindi
    ("fruits.png", "ما الفواكه الموجودة في هذه الصورة؟"),  # Arabic
    ("street.png", "اس تصویر میں کیا ہو رہا ہے؟"),  # Urdu
    ("street.png", "¿Qué tiene de extraño esta imagen?"),  # Spanish
    ("fruits.png", "请描述这张图片。"),  # Chinese
    ("fridge.png", "এই ফ্রিজে কোন খাবারগুলো আছে?"),  # Bengali
    ("street.png", "Что изображено на этой картинке?"),  # Russian
    ("fruits.png", "What is unusual about this image?"),  # English
]


def draw_example_images(out_dir: str | None = None, overwrite: bool = False) -> list[str]:
    """Draw the example images into ``out_dir`` (default :func:`examples_dir`; only the missing ones unless
    ``overwrite``).

    Returns:
        The paths of all example images.

    Raises:
        OSError: If the folder cannot be written.
    """
    out_dir = out_dir or examples_dir()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, draw in DRAWINGS.items():
        path = os.path.join(out_dir, name)
        if overwrite or not os.path.isfile(path):
            draw().save(path, optimize=True)
        paths.append(path)
    return paths


def example_rows(out_dir: str | None = None) -> list[list[str]]:
    """``[[image path, question], ...]`` for ``gr.Examples``, drawing missing images first.

    Raises:
        OSError: If a missing image cannot be drawn there.
    """
    paths = draw_example_images(out_dir)
    folder = os.path.dirname(paths[0])
    return [[os.path.join(folder, name), question] for name, question in EXAMPLES]


if __name__ == "__main__":
    for written in draw_example_images(overwrite=True):
        print(written, os.path.getsize(written), "bytes")
