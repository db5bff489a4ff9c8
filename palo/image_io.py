"""The pixels a viewer shows, from whatever a file stores: EXIF orientation applied, transparency on white, 16-bit grey
scaled to 8 bits.

Every image the model sees (training, evaluation, the CLI, the worker, the OpenAI API, the web demo) passes through
these two functions, so each path sees the same pixels. Kept free of torch so that the web demo can use them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: pixels turned by its EXIF ``Orientation`` tag (phone photos carry one).

    The original loaders fed the stored pixels, so a portrait phone photo reached the model on its side while the
    person asking saw it upright (the original web demo alone was spared: Gradio turns uploads itself).
    transformers' ``load_image`` turns them too, so an exported checkpoint sees the same pixels.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser fails in many ways on a broken block; viewers ignore it
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB image a viewer shows: transparency laid over white, 16-bit grey scaled to 8 bits.

    A plain ``convert("RGB")`` (the original's) keeps the colour stored under transparent pixels, usually black, so a
    logo or diagram of black lines on a transparent background became an all-black image (transformers'
    ``convert_to_rgb`` lays it over white too); and it clips 16-bit grey (scans, microscopy, depth maps) at 255, so
    such an image became almost all white.
    """
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit samples (Pillow reads 16-bit PNGs as these)
        grey = np.asarray(image).astype(np.float32) / 257.0  # 65535 -> 255, as viewers scale them
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if not {"A", "a"} & set(image.getbands()) and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
