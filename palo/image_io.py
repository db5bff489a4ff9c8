"""Images as viewers show them, and bounds that keep their preprocessing cheap.

``upright`` and ``to_rgb`` give the pixels a viewer shows from whatever a file stores (EXIF orientation applied,
transparency on white, 16-bit grey scaled to 8 bits); every image the model sees (training, evaluation, lmms-eval
tasks, the CLI, the worker, the OpenAI API, the web demo) passes through both (:func:`viewed`), so each path sees the
same pixels. ``fit_square_canvas`` and ``trim_for_centre_crop`` keep the images made while preprocessing within
:data:`MAX_IMAGE_PIXELS`, whatever the shape: without them a thin sliver of a few hundred bytes (1x60000) padded to a
60000x60000 square, about 10 GB. ``load_image`` and ``load_image_from_base64`` read a file, URL or base64 string
through the same rules, refusing what cannot be read with :class:`ImageLoadError` (:mod:`palo.mm_utils` keeps them
under their LLaVA names). Kept free of torch so that the web demo and ``palo-data validate`` can use them.
"""

from __future__ import annotations

import base64
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: refuse images with more pixels than this (8000 x 8000). CLIP sees 336x336 anyway. The
# images made while preprocessing (the padded square, the resized strip before the centre crop) are held to it too.
MAX_IMAGE_PIXELS = 64_000_000

_ORIENTATION = 0x0112  # the EXIF tag; 2-8 ask for a mirror and/or a turn


class ImageLoadError(ValueError):
    """An image could not be read: missing, corrupt, not an image, or too large."""


def _open_image(source: Any, name: str) -> Image.Image:
    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageLoadError(
                f"{name}: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS:,}; resize the image first"
            )
        image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses before the size check above can run
        raise ImageLoadError(f"{name}: over the limit of {MAX_IMAGE_PIXELS:,} pixels; resize the image first") from exc
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer by its address: no help
        raise ImageLoadError(f"{name}: not a readable image (not a format Pillow can identify)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({exc})") from exc
    return viewed(image)


def load_image(path_or_url: str | os.PathLike, allow_remote: bool = False, policy: Any = None) -> Image.Image:
    """Open a local image file, or an http(s) URL when ``allow_remote``, as RGB.

    Args:
        path_or_url: A local path (``str`` or :class:`os.PathLike`), or an ``http(s)://`` URL.
        allow_remote: Fetch URLs (``--allow-remote-images``); without it they are refused.
        policy: A :class:`palo.remote_images.RemoteImagePolicy` (size and time limits, allowed networks).

    Returns:
        The image in RGB mode.

    Raises:
        ImageLoadError: If the file is missing, not an image, corrupt or too large, or a URL is refused.
    """
    from palo.remote_images import RemoteImagePolicy, fetch_image_bytes, is_remote

    if isinstance(path_or_url, os.PathLike):
        path_or_url = os.fspath(path_or_url)
    if not isinstance(path_or_url, str):
        raise ImageLoadError(f"an image is a path or a URL, not {type(path_or_url).__name__}")
    if is_remote(path_or_url):
        if not allow_remote:
            raise ImageLoadError(f"{path_or_url}: remote images are not fetched without --allow-remote-images; "
                                 "or download it and pass a local path")
        return _open_image(io.BytesIO(fetch_image_bytes(path_or_url, policy or RemoteImagePolicy())), path_or_url)
    if not os.path.isfile(path_or_url):
        raise ImageLoadError(f"{path_or_url}: no such image file")
    with open(path_or_url, "rb") as f:
        return _open_image(io.BytesIO(f.read()), path_or_url)


def load_image_from_base64(data: str) -> Image.Image:
    """Decode a base64 string (optionally a ``data:image/...;base64,`` URL) into an RGB image.

    Raises:
        ImageLoadError: If the string is not valid base64 or not an image.
    """
    if is_data_url(data):
        _, _, data = data.partition(",")
    if any(space in data for space in " \n\r\t"):  # line-wrapped base64 (the `base64` tool's), as the original took
        data = "".join(data.split())
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise ImageLoadError(f"image is not valid base64 ({exc})") from exc
    return _open_image(io.BytesIO(raw), "base64 image")


def is_data_url(value: str) -> bool:
    """A ``data:`` URL: the scheme matched without regard to case, as URL schemes are (RFC 3986 3.1)."""
    return value[:5].lower() == "data:"


def data_url_base64(url: str) -> str | None:
    """The payload of a base64 ``data:[<mime>];base64,<payload>`` URL (``DATA:IMAGE/PNG;BASE64,`` too, as browsers
    read them), or None for anything else."""
    header, sep, payload = url.partition(",")
    return payload if sep and is_data_url(header) and header.lower().endswith(";base64") else None


def viewed(image: Image.Image) -> Image.Image:
    """The RGB image a viewer shows (:func:`upright`, then :func:`to_rgb`): every image the model sees goes this way."""
    return to_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: pixels turned by its EXIF ``Orientation`` tag (phone photos carry one).

    The original loaders fed the stored pixels, so a portrait phone photo reached the model on its side while the
    person asking saw it upright (the original web demo alone was spared: Gradio turns uploads itself).
    """
    if not _asks_for_a_turn(image):  # nearly every image: as stored
        return image  # exif_transpose would copy it (for a whole request, no faster or slower: image_load.py)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser fails in many ways on a broken block; viewers ignore it
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB image a viewer shows: transparency laid over white, 16-bit grey scaled to 8 bits (and its
    transparent grey value, if it names one, white).

    A plain ``convert("RGB")`` (the original's) keeps the colour stored under transparent pixels, usually black, so a
    logo or diagram of black lines on a transparent background became an all-black image (transformers'
    ``convert_to_rgb`` lays it over white too, but its ``load_image`` converts before that); and it clips 16-bit grey
    (scans, microscopy, depth maps) at 255, so such an image became almost all white.
    """
    if _is_16_bit(image):
        stored = np.asarray(image)
        grey = np.clip(np.rint(stored.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, as viewers
        key = image.info.get("transparency")
        if isinstance(key, int):  # a grey value named transparent (PNG tRNS): on white, as for 8-bit grey below
            grey[stored == key] = 255
        return Image.fromarray(grey).convert("RGB")  # 2-D uint8: "L"
    if not _has_transparency(image):
        # Even an RGB image is converted (copied): returning the decoder's own image object saved 10 ms of a
        # 12-megapixel load but made its preprocessing 40 ms slower (scripts/bench/image_load.py).
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _asks_for_a_turn(image: Image.Image) -> bool:
    """An EXIF ``Orientation`` of 2-8 (1, absent, another value or a broken EXIF block: shown as stored)."""
    try:
        return image.getexif().get(_ORIENTATION, 1) in range(2, 9)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser fails in many ways on a broken block; viewers ignore it
        return False


def _is_16_bit(image: Image.Image) -> bool:
    return image.mode.startswith("I;16") or image.mode == "I"  # Pillow reads 16-bit PNGs as these


def _has_transparency(image: Image.Image) -> bool:
    """An alpha band, or a colour (RGB, L) or palette index (P) named transparent."""
    return bool({"A", "a"} & set(image.getbands())) or "transparency" in image.info


def fit_square_canvas(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image, scaled down only if the square it will be padded to would have more than ``max_pixels``.

    Every image whose long side is at most ``isqrt(max_pixels)`` (8,000 px) is returned unchanged, so its pixel values
    are exactly the original's; a longer one (a long panorama, a sliver) is scaled to that long side first.
    """
    side = math.isqrt(max_pixels)
    width, height = image.size
    if max(width, height) <= side:
        return image
    scale = side / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def trim_for_centre_crop(image: Image.Image, shortest_edge: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image, cut to its centre only if resizing its short side to ``shortest_edge`` would exceed ``max_pixels``.

    A processor that resizes the short side and then centre-crops a square keeps only the middle of a long image, but
    first makes the whole resized strip: ``shortest_edge**2 * aspect`` pixels, over a billion for a 1x10000 sliver at
    336 (11 GB of memory measured). An image with an aspect ratio up to ``max_pixels / shortest_edge**2`` (566:1 at
    336) is returned unchanged; a longer one is cut, around its centre, to that ratio, which keeps all that the centre
    crop keeps.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    max_long = max(short, short * max_pixels // (shortest_edge * shortest_edge))
    max_long += (long - max_long) % 2  # an even cut: a half-pixel shift would move the crop ~84 pixels at 336
    if long <= max_long:
        return image
    offset = (long - max_long) // 2
    box = (offset, 0, offset + max_long, height) if width > height else (0, offset, width, offset + max_long)
    return image.crop(box)


def read_differently(image: Image.Image) -> list[str]:
    """Which of this module's rules touch a stored image, where the original read it with ``convert("RGB")``.

    For reports (``palo-data validate``): the orientation, bit depth and size come from the image's header; only an
    image whose header names transparency (an alpha band, a transparent colour or palette index) is decoded, to see
    whether any pixel is actually see-through.

    Returns:
        Some of ``"exif_orientation"`` (turned upright), ``"transparency"`` (some pixel see-through, by its alpha or
        a transparent colour: laid on white; an alpha of 255 everywhere reads as the original read it),
        ``"16_bit"`` (scaled, not clipped) and ``"pad_scaled"`` (long side over ``isqrt(MAX_IMAGE_PIXELS)``: scaled
        before ``pad``).
    """
    notes = ["exif_orientation"] if _asks_for_a_turn(image) else []
    if _is_16_bit(image):
        notes.append("16_bit")
    if _shows_transparency(image):
        notes.append("transparency")
    if max(image.size) > math.isqrt(MAX_IMAGE_PIXELS):
        notes.append("pad_scaled")
    return notes


def _shows_transparency(image: Image.Image) -> bool:
    """Some pixel is see-through: what :func:`to_rgb` lays on white differs from the original's ``convert("RGB")``.

    :func:`_has_transparency` (the header) is not enough: an RGBA file whose alpha is 255 everywhere is common (many
    tools always write one) and composites to exactly the original's pixels. Only such images are decoded here.
    """
    if not _has_transparency(image):
        return False
    if _is_16_bit(image):  # to_rgb whitens the stored grey value named transparent, where it occurs
        key = image.info.get("transparency")
        return isinstance(key, int) and bool((np.asarray(image) == key).any())
    bands = image.getbands()
    alpha_band = next((band for band in ("A", "a") if band in bands), None)
    # With no alpha band, Pillow's RGBA conversion turns the transparent colour or palette entries into alpha, as
    # to_rgb's does.
    alpha = image.getchannel(alpha_band) if alpha_band else image.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255
