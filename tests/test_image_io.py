"""The bounds on preprocessing's intermediate images (palo/image_io.py); reading rules are tested through the loaders
in test_mm_utils.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from palo.image_io import fit_square_canvas, read_differently, to_rgb, trim_for_centre_crop, upright


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(10, 10), (10, 1), (1, 10), (7, 3)])
def test_an_image_whose_square_fits_is_returned_as_it_is(size):
    image = _noise(*size)
    assert fit_square_canvas(image, max_pixels=100) is image


@pytest.mark.parametrize("size, scaled", [((40, 4), (10, 1)), ((4, 40), (1, 10)), ((11, 11), (10, 10)),
                                          ((1, 60000), (1, 10))])
def test_a_longer_image_is_scaled_to_the_squares_side(size, scaled):
    assert fit_square_canvas(Image.new("RGB", size), max_pixels=100).size == scaled


@pytest.mark.parametrize("size", [(5, 100), (100, 5), (5, 5), (1, 4)])
def test_an_aspect_within_the_limit_is_not_cut(size):
    image = _noise(*size)
    assert trim_for_centre_crop(image, shortest_edge=2, max_pixels=80) is image  # up to 20:1 kept


@pytest.mark.parametrize("wide", [True, False])
def test_a_longer_image_is_cut_around_its_centre(wide):
    stored = np.random.default_rng(1).integers(0, 256, (4, 200, 3), dtype=np.uint8)  # 200 wide, 4 high
    if not wide:
        stored = stored.transpose(1, 0, 2).copy()
    trimmed = trim_for_centre_crop(Image.fromarray(stored), shortest_edge=2, max_pixels=80)  # 20:1 -> 80 long
    expected = stored[:, 60:140] if wide else stored[60:140]
    assert np.array_equal(np.asarray(trimmed), expected)


@pytest.mark.parametrize("orientation", [None, 1, 0, 9])
def test_an_image_that_asks_for_no_turn_is_not_copied(orientation):
    image = _noise(4, 2)
    if orientation is not None:
        image.getexif()[0x0112] = orientation  # 0 and 9 are not orientations: viewers show the stored pixels
    assert upright(image) is image


def test_an_rgb_image_keeps_its_pixels_unless_it_names_a_transparent_colour():
    image = _noise(4, 2)
    image.putpixel((0, 0), (0, 0, 0))
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image))
    image.info["transparency"] = (0, 0, 0)  # an RGB PNG may name one colour transparent: that one is laid on white
    expected = np.asarray(image).copy()
    expected[0, 0] = 255
    assert np.array_equal(np.asarray(to_rgb(image)), expected)


@pytest.mark.parametrize("long", [201, 203])
def test_an_odd_cut_is_kept_even_so_the_centre_stays_the_centre(long):
    """Before, cutting 121 of 201 columns took 60 on one side and 61 on the other: half a source column off centre,
    which the resize to the model's size turned into a crop tens of pixels away from the untrimmed one."""
    stored = np.random.default_rng(2).integers(0, 256, (4, long, 3), dtype=np.uint8)
    trimmed = trim_for_centre_crop(Image.fromarray(stored), shortest_edge=2, max_pixels=80)  # 20:1 -> 80 long
    cut = long - trimmed.size[0]
    assert cut % 2 == 0 and trimmed.size[0] in (80, 81)
    assert np.array_equal(np.asarray(trimmed), stored[:, cut // 2:long - cut // 2])


def test_sixteen_bit_grey_with_a_transparent_grey_is_counted_under_both_rules():
    image = Image.fromarray(np.zeros((2, 3), dtype=np.uint16))
    assert read_differently(image) == ["16_bit"]
    image.info["transparency"] = 0
    assert read_differently(image) == ["16_bit", "transparency"]


def test_transparency_is_counted_only_where_a_pixel_is_see_through():
    """An RGBA image whose alpha is 255 everywhere was counted under "transparency" from its header, though it reads
    exactly as the original read it."""
    opaque = _noise(4, 3).convert("RGBA")
    assert read_differently(opaque) == []
    assert np.array_equal(np.asarray(to_rgb(opaque)), np.asarray(opaque.convert("RGB")))
    seen_through = opaque.copy()
    seen_through.putpixel((1, 1), (0, 0, 0, 128))
    assert read_differently(seen_through) == ["transparency"]
    # A palette index named transparent counts only where some pixel uses it.
    palette = Image.new("P", (3, 2), 1)
    palette.info["transparency"] = 0
    assert read_differently(palette) == []
    palette.putpixel((2, 1), 0)
    assert read_differently(palette) == ["transparency"]
    # So does a colour named transparent in an RGB image.
    rgb = Image.new("RGB", (3, 2), (10, 20, 30))
    rgb.info["transparency"] = (0, 0, 0)
    assert read_differently(rgb) == []
    rgb.putpixel((0, 0), (0, 0, 0))
    assert read_differently(rgb) == ["transparency"]
