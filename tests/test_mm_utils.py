"""Tests for palo.mm_utils: the ``<image>`` tokenisation rule (docs/formats.md §3.2), the ``pad`` / ``square`` image
preprocessing (docs/formats.md §2.2, checked against a pipeline written here with PIL and numpy), image loading
errors, checkpoint display names and the keyword stopping criterion (docs/formats.md §3.8)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from palo import image_io, mm_utils
from palo.image_io import to_rgb
from palo.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    load_image,
    load_image_from_base64,
    pad_color,
    preprocess_image,
    process_images,
    tokenizer_image_token,
)
from palo.model.tokenizer import load_tokenizer
from palo.model.vision_tower import build_clip_image_processor

BOS, EOS, IMG = 1, 2, -200
PAD_RGB = (122, 116, 104)  # CLIP mean x 255, truncated (docs/formats.md §2.2)
# CLIP's statistics, typed out from docs/formats.md §2.1.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
CROP = 56


@pytest.fixture(scope="module")
def tokenizer(world):
    return load_tokenizer(world.tokenizer_dir)


@pytest.fixture(scope="module")
def processor():
    return build_clip_image_processor(CROP)


# --------------------------------------------------------------------------------------------------------------------
# tokenizer_image_token


def _text(tokenizer, chunk: str) -> list[int]:
    """The ids of one chunk tokenized as a fresh sequence, without its BOS."""
    ids = tokenizer(chunk).input_ids
    assert ids[0] == BOS
    return ids[1:]


def test_image_at_start(tokenizer):
    prompt = "<image>\nWhat is shown in this image?"
    expected = [BOS, IMG] + _text(tokenizer, "\nWhat is shown in this image?")
    assert tokenizer_image_token(prompt, tokenizer) == expected
    # The "\n" after the image begins a fresh SentencePiece sequence: dummy prefix "▁" then the newline byte.
    assert tokenizer.convert_ids_to_tokens(expected[2:4]) == ["▁", "<0x0A>"]


def test_image_in_the_middle_vicuna_prompt(tokenizer):
    head = "A chat between a curious user and an artificial intelligence assistant. USER: "
    tail = "\nDescribe the scene in detail, please. ASSISTANT:"
    expected = [BOS] + _text(tokenizer, head) + [IMG] + _text(tokenizer, tail)
    ids = tokenizer_image_token(head + "<image>" + tail, tokenizer)
    assert ids == expected
    assert ids.count(BOS) == 1 and ids.count(IMG) == 1


def test_image_at_end(tokenizer):
    expected = [BOS] + _text(tokenizer, "Describe this:") + [IMG]
    assert tokenizer_image_token("Describe this:<image>", tokenizer) == expected


def test_two_images(tokenizer):
    prompt = "First <image> and second <image> 图片中有什么？"
    expected = (
        [BOS] + _text(tokenizer, "First ") + [IMG] + _text(tokenizer, " and second ") + [IMG]
        + _text(tokenizer, " 图片中有什么？")
    )
    ids = tokenizer_image_token(prompt, tokenizer)
    assert ids == expected
    assert ids.count(BOS) == 1 and ids.count(IMG) == 2


def test_adjacent_images_and_image_only(tokenizer):
    assert tokenizer_image_token("<image>", tokenizer) == [BOS, IMG]
    assert tokenizer_image_token("<image><image>", tokenizer) == [BOS, IMG, IMG]


def test_no_image_equals_plain_tokenizer(tokenizer):
    prompt = "USER: hello</s>USER: again ASSISTANT:"
    assert tokenizer_image_token(prompt, tokenizer) == tokenizer(prompt).input_ids


def test_custom_image_index_and_tensor_output(tokenizer):
    prompt = "<image>\nDescribe it."
    expected = [BOS, -1] + _text(tokenizer, "\nDescribe it.")
    assert tokenizer_image_token(prompt, tokenizer, image_token_index=-1) == expected
    out = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.long and out.dim() == 1
    assert out.tolist() == [BOS, IMG] + expected[2:]
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        tokenizer_image_token(prompt, tokenizer, return_tensors="np")


# --------------------------------------------------------------------------------------------------------------------
# expand2square / pad_color


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


class _SeenSizes:
    """A processor that records the size of each image it is handed, then preprocesses it as the real one."""

    def __init__(self, processor):
        self.processor, self.sizes = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def preprocess(self, image, **kwargs):
        self.sizes.append(image.size)
        return self.processor.preprocess(image, **kwargs)


def test_a_sliver_is_cut_to_what_the_centre_crop_keeps_and_gives_the_same_pixels(processor, monkeypatch):
    sliver = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4000, 20, 3), dtype=np.uint8))  # 20x4000
    spy = _SeenSizes(processor)
    whole = preprocess_image(sliver, spy, "square")
    assert spy.sizes == [(20, 4000)]
    # Allow a resized strip of 20 squares (CROP x 20*CROP): the 200:1 sliver is cut to 20:1 around its centre.
    monkeypatch.setattr(mm_utils, "MAX_IMAGE_PIXELS", CROP * CROP * 20)
    cut = preprocess_image(sliver, spy, "square")
    assert spy.sizes[-1] == (20, 400)
    assert torch.equal(cut, whole)  # the centre crop never reached the part cut away


def test_the_padded_square_stays_within_the_pixel_limit(processor, monkeypatch):
    panorama = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 3000, 3), dtype=np.uint8))
    spy = _SeenSizes(processor)
    whole = preprocess_image(panorama, spy, "pad")
    assert spy.sizes == [(3000, 3000)]
    monkeypatch.setattr(mm_utils, "MAX_IMAGE_PIXELS", 1000 * 1000)
    bounded = preprocess_image(panorama, spy, "pad")
    assert spy.sizes[-1] == (1000, 1000)
    assert (bounded - whole).abs().mean() < 0.01  # normalised pixels: the same picture, resampled once more
    at_the_limit = panorama.resize((1000, 17))
    assert torch.equal(preprocess_image(at_the_limit, spy, "pad"),
                       processor.preprocess(expand2square(at_the_limit, pad_color(processor)),
                                            return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_process_images_reads_a_callers_own_image_as_the_loaders_do(processor, aspect, tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png", exif=_exif_orientation(6))
    scan = Image.fromarray(np.arange(40 * 20, dtype=np.uint16).reshape(20, 40) * 80)
    scan.save(tmp_path / "scan.png")
    cfg = SimpleNamespace(image_aspect_ratio=aspect)
    for name in ("photo.png", "scan.png"):
        opened = Image.open(tmp_path / name)  # as a user's script opens it, without palo's loaders
        assert torch.equal(process_images([opened], processor, cfg),
                           process_images([load_image(str(tmp_path / name))], processor, cfg))
    assert not torch.equal(process_images([Image.open(tmp_path / "photo.png")], processor, cfg),
                           process_images([photo], processor, cfg))  # the turn made a difference


def test_pad_color_of_clip_processor(processor):
    assert pad_color(processor) == PAD_RGB


def test_expand2square_wide():
    image = _random_image(97, 41)
    out = expand2square(image, PAD_RGB)
    assert out.size == (97, 97) and out.mode == "RGB"
    arr = np.asarray(out)
    top = (97 - 41) // 2  # 28
    assert np.array_equal(arr[top:top + 41], np.asarray(image))
    assert (arr[:top] == PAD_RGB).all() and (arr[top + 41:] == PAD_RGB).all()
    assert top == 28 and arr[top + 41:].shape[0] == 28


def test_expand2square_tall():
    image = _random_image(30, 77, seed=1)
    out = expand2square(image, PAD_RGB)
    assert out.size == (77, 77) and out.mode == "RGB"
    arr = np.asarray(out)
    left = (77 - 30) // 2  # 23
    assert np.array_equal(arr[:, left:left + 30], np.asarray(image))
    assert (arr[:, :left] == PAD_RGB).all() and (arr[:, left + 30:] == PAD_RGB).all()
    assert left == 23 and arr[:, left + 30:].shape[1] == 24  # odd difference: the extra column goes right


def test_expand2square_square_unchanged():
    image = _random_image(40, 40, seed=2)
    out = expand2square(image, PAD_RGB)
    assert out.size == (40, 40)
    assert np.array_equal(np.asarray(out), np.asarray(image))


# --------------------------------------------------------------------------------------------------------------------
# process_images


def _drawn(width: int, height: int) -> Image.Image:
    """A non-uniform RGB image: a background with coloured shapes reaching every edge."""
    image = Image.new("RGB", (width, height), (20, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 6, width * 3 // 4, height * 5 // 6], fill=(230, 40, 30))
    draw.rectangle([0, 0, width // 3, height // 4], fill=(250, 240, 10))
    draw.polygon([(width - 1, height - 1), (width // 2, height - 1), (width - 1, height // 2)], fill=(30, 200, 60))
    draw.line([(0, height - 1), (width - 1, 0)], fill=(255, 255, 255), width=2)
    return image


def _normalise_chw(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float64) / 255.0
    arr = (arr - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32))


def _expected_pad(image: Image.Image) -> torch.Tensor:
    w, h = image.size
    side = max(w, h)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = PAD_RGB
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(image)
    square = Image.fromarray(canvas, "RGB").resize((CROP, CROP), Image.BICUBIC)
    return _normalise_chw(square)


def _expected_square(image: Image.Image) -> torch.Tensor:
    w, h = image.size
    # transformers' shortest-edge rule: short side = size, long side = int(size * long / short).
    if w <= h:
        new_w, new_h = CROP, int(CROP * h / w)
    else:
        new_w, new_h = int(CROP * w / h), CROP
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - CROP) // 2, (new_h - CROP) // 2
    return _normalise_chw(resized.crop((left, top, left + CROP, top + CROP)))


SIZES = [(97, 41), (30, 77)]


def test_process_images_pad(processor):
    images = [_drawn(w, h) for w, h in SIZES]
    out = process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, CROP, CROP) and out.dtype == torch.float32
    for got, image in zip(out, images):
        torch.testing.assert_close(got, _expected_pad(image), atol=1e-5, rtol=0)
    # The padded border is the pad colour, normalised: the top row of the wide image.
    border = torch.tensor((np.array(PAD_RGB) / 255.0 - MEAN) / STD, dtype=torch.float32)
    torch.testing.assert_close(out[0, :, 0, CROP // 2], border, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aspect", ["square", None])
def test_process_images_square_or_none(processor, aspect):
    images = [_drawn(w, h) for w, h in SIZES]
    cfg = SimpleNamespace(image_aspect_ratio=aspect) if aspect else SimpleNamespace()  # None: attribute absent
    out = process_images(images, processor, cfg)
    assert out.shape == (2, 3, CROP, CROP) and out.dtype == torch.float32
    for got, image in zip(out, images):
        torch.testing.assert_close(got, _expected_square(image), atol=1e-5, rtol=0)
    # Cropping and padding really differ for a non-square image.
    assert not torch.allclose(out[0], _expected_pad(images[0]), atol=1e-2)


def test_process_images_square_input_pad_equals_square(processor):
    image = _drawn(73, 73)
    pad = process_images([image], processor, SimpleNamespace(image_aspect_ratio="pad"))
    square = process_images([image], processor, SimpleNamespace(image_aspect_ratio="square"))
    expected = _normalise_chw(image.resize((CROP, CROP), Image.BICUBIC))
    torch.testing.assert_close(pad[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(square[0], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# load_image / load_image_from_base64


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_load_png_exact_and_jpeg(tmp_path):
    image = _drawn(97, 41)
    png = tmp_path / "a.png"
    png.write_bytes(_encode(image, "PNG"))
    loaded = load_image(str(png))
    assert loaded.mode == "RGB" and loaded.size == (97, 41)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))

    jpg = tmp_path / "b.jpg"
    jpg.write_bytes(_encode(image, "JPEG", quality=95))
    loaded = load_image(str(jpg))
    assert loaded.mode == "RGB" and loaded.size == (97, 41)
    assert np.abs(np.asarray(loaded, dtype=int) - np.asarray(image, dtype=int)).mean() < 10


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_converts_to_rgb(tmp_path, mode):
    path = tmp_path / f"m_{mode}.png"
    path.write_bytes(_encode(_drawn(30, 77).convert(mode), "PNG"))
    loaded = load_image(str(path))
    assert loaded.mode == "RGB" and loaded.size == (30, 77)


def test_load_rejects_corrupt_bytes(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ImageLoadError, match="not a readable image") as info:
        load_image(str(path))
    assert str(path) in str(info.value)


def test_load_rejects_truncated_jpeg(tmp_path):
    data = _encode(_drawn(97, 41), "JPEG", quality=95)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="not a readable image") as info:
        load_image(str(path))
    assert str(path) in str(info.value) and "truncated" in str(info.value)


def test_load_rejects_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(str(path))


def test_load_rejects_missing_path_and_url(tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="no such image file") as info:
        load_image(missing)
    assert missing in str(info.value)
    with pytest.raises(ImageLoadError, match="remote images are not fetched"):
        load_image("https://example.com/a.png")


def test_load_rejects_too_many_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 1000)  # the loaders' limit (mm_utils re-exports them)
    data = _encode(_drawn(50, 30), "PNG")  # 1500 pixels
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="50x30 pixels is over the limit"):
        load_image(str(path))
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image_from_base64(base64.b64encode(data).decode())
    # At the limit is fine.
    path.write_bytes(_encode(_drawn(40, 25), "PNG"))
    assert load_image(str(path)).size == (40, 25)


def test_an_image_pillow_calls_a_decompression_bomb_gets_our_message(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses above twice this, before our check
    data = base64.b64encode(_encode(Image.new("L", (50, 30)), "PNG")).decode()  # 1,500 pixels
    with pytest.raises(ImageLoadError, match=f"^base64 image: over the limit of {mm_utils.MAX_IMAGE_PIXELS:,} pixels; "
                                             "resize the image first$"):
        load_image_from_base64(data)


def test_load_from_base64_plain_and_data_url():
    image = _drawn(30, 77)
    b64 = base64.b64encode(_encode(image, "PNG")).decode()
    for data in (b64, "data:image/png;base64," + b64):
        loaded = load_image_from_base64(data)
        assert loaded.mode == "RGB"
        assert np.array_equal(np.asarray(loaded), np.asarray(image))
    jpeg = base64.b64encode(_encode(image, "JPEG")).decode()
    assert load_image_from_base64("data:image/jpeg;base64," + jpeg).size == (30, 77)
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + "\n"  # as the `base64` tool writes it
    assert np.array_equal(np.asarray(load_image_from_base64(wrapped)), np.asarray(image))
    assert np.array_equal(np.asarray(load_image_from_base64("data:image/png;base64,\r\n " + wrapped)),
                          np.asarray(image))


def test_a_data_url_is_read_whatever_the_case_of_its_scheme():
    """URL schemes are case-insensitive (RFC 3986), and browsers read ``;BASE64`` too: the worker took
    ``data:image/png;BASE64,`` but called ``DATA:IMAGE/PNG;BASE64,`` "not valid base64"."""
    image = _drawn(30, 77)
    b64 = base64.b64encode(_encode(image, "PNG")).decode()
    for header in ("DATA:IMAGE/PNG;BASE64,", "Data:image/png;base64,", "data:image/png;BASE64,"):
        assert np.array_equal(np.asarray(load_image_from_base64(header + b64)), np.asarray(image))


def test_a_path_object_is_a_path_and_anything_else_is_refused_by_name(tmp_path):
    image = _drawn(30, 20)
    image.save(tmp_path / "drawn.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "drawn.png")), np.asarray(image))
    with pytest.raises(ImageLoadError, match="^an image is a path or a URL, not int$"):
        load_image(7)


def test_load_from_base64_errors():
    with pytest.raises(ImageLoadError, match="not valid base64"):
        load_image_from_base64("this is %% not base64!")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image_from_base64(base64.b64encode(b"plain text, not an image").decode())
    data = _encode(_drawn(97, 41), "JPEG")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image_from_base64(base64.b64encode(data[: len(data) // 3]).decode())


def _marked(width: int, height: int) -> Image.Image:
    """Blue, with the stored pixels' left column red: where that column lands shows how the image was turned."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    ImageDraw.Draw(image).line([(0, 0), (0, height - 1)], fill=(255, 0, 0))
    return image


def _exif_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    return exif


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    return _encode(image, "PNG", exif=_exif_orientation(orientation))  # PNG: exact pixels; the tag in an eXIf chunk


def test_a_phone_photos_orientation_tag_is_applied_on_every_path(tmp_path):
    stored = _marked(4, 2)
    # Orientation 6: "turn 90 degrees clockwise to display" (a phone held upright); the red left column goes on top.
    data = _with_orientation(stored, 6)
    path = tmp_path / "portrait.png"
    path.write_bytes(data)
    for loaded in (load_image(str(path)), load_image_from_base64(base64.b64encode(data).decode())):
        assert loaded.size == (2, 4)
        pixels = np.asarray(loaded)
        assert (pixels[0] == [255, 0, 0]).all() and (pixels[1:] == [0, 0, 255]).all()
    # Orientation 3: upside down; the red column ends on the right.
    upside_down = load_image_from_base64(base64.b64encode(_with_orientation(stored, 3)).decode())
    assert upside_down.size == (4, 2)
    pixels = np.asarray(upside_down)
    assert (pixels[:, -1] == [255, 0, 0]).all() and (pixels[:, :-1] == [0, 0, 255]).all()


@pytest.mark.parametrize("exif", [b"garbage, not a TIFF header", b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"],
                         ids=["not-tiff", "offset-past-end"])
def test_a_broken_exif_block_leaves_the_stored_pixels(exif):
    stored = _marked(4, 2)
    loaded = load_image_from_base64(base64.b64encode(_encode(stored, "PNG", exif=exif)).decode())
    assert np.array_equal(np.asarray(loaded), np.asarray(stored))


def test_transparency_is_laid_over_white():
    # Black strokes on a transparent background (a logo, a diagram): a plain convert("RGB") made it all black.
    drawing = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    drawing.putpixel((1, 1), (0, 0, 0, 255))
    drawing.putpixel((2, 1), (255, 0, 0, 128))  # half-transparent red
    loaded = np.asarray(load_image_from_base64(base64.b64encode(_encode(drawing, "PNG")).decode()), dtype=int)
    assert (loaded[1, 1] == [0, 0, 0]).all()
    assert (np.abs(loaded[1, 2] - [255, 127, 127]) <= 1).all()
    background = np.ones(loaded.shape[:2], dtype=bool)
    background[1, 1:3] = False
    assert (loaded[background] == 255).all()
    # The same in grey with alpha, and a palette image with a transparent index.
    grey = load_image_from_base64(base64.b64encode(_encode(drawing.convert("LA"), "PNG")).decode())
    assert np.asarray(grey)[0, 0].tolist() == [255, 255, 255] and np.asarray(grey)[1, 1].tolist() == [0, 0, 0]
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    loaded = np.asarray(load_image_from_base64(base64.b64encode(_encode(palette, "PNG", transparency=0)).decode()))
    assert loaded.tolist() == [[[255, 255, 255], [0, 255, 0], [255, 255, 255]]]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    stored = Image.fromarray(levels)
    assert stored.mode == "I;16"
    loaded = load_image_from_base64(base64.b64encode(_encode(stored, "PNG")).decode())
    assert np.asarray(loaded)[..., 0].tolist() == [[0, 1, 128, 255]]
    assert np.asarray(loaded).std(axis=-1).max() == 0  # grey
    assert np.asarray(to_rgb(stored.convert("I")))[..., 0].tolist() == [[0, 1, 128, 255]]


def test_sixteen_bit_grey_naming_a_transparent_grey_is_white_there():
    """A PNG tRNS key on 16-bit grey, laid on white as for 8-bit grey (it came out black: scaled, never composited)."""
    stored = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    for image in (stored, Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8))):  # 16 and 8 bits alike
        loaded = load_image_from_base64(base64.b64encode(_encode(image, "PNG", transparency=0)).decode())
        assert np.asarray(loaded)[..., 0].tolist() == [[255, 128, 255]], image.mode


def test_an_opaque_image_with_alpha_keeps_its_pixels():
    image = _drawn(30, 20)
    loaded = load_image_from_base64(base64.b64encode(_encode(image.convert("RGBA"), "PNG")).decode())
    assert np.array_equal(np.asarray(loaded), np.asarray(image))

# --------------------------------------------------------------------------------------------------------------------
# get_model_name_from_path


@pytest.mark.parametrize(
    "path, name",
    [
        ("/ckpts/palo-v1.5-7b", "palo-v1.5-7b"),
        ("/ckpts/palo-v1.5-7b/", "palo-v1.5-7b"),
        ("MBZUAI/PALO-13B", "PALO-13B"),
        ("relative", "relative"),
        ("/out/run/checkpoint-100", "run_checkpoint-100"),
        ("/out/run/checkpoint-100/", "run_checkpoint-100"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


# --------------------------------------------------------------------------------------------------------------------
# KeywordsStoppingCriteria


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


def test_stops_on_eos_id(tokenizer):
    prompt = _ids(tokenizer, "USER: What colour is it? ASSISTANT:")
    answer = _ids(tokenizer, "It is blue.")[1:]
    criteria = KeywordsStoppingCriteria(["</s>"], tokenizer, torch.tensor([prompt]))
    assert criteria.keyword_ids[0].tolist() == [EOS]  # BOS dropped from the keyword's ids
    running = torch.tensor([prompt + answer])
    done = torch.tensor([prompt + answer + [EOS]])
    assert criteria(running, None).tolist() == [False]
    assert criteria(done, None).tolist() == [True]


def test_stops_on_multi_token_keyword(tokenizer, world):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{world.tokenizer_dir}/tokenizer.model")
    prompt = _ids(tokenizer, "### Human: What is shown? ### Assistant:")
    criteria = KeywordsStoppingCriteria(["###"], tokenizer, torch.tensor([prompt]))
    keyword = sp.encode("###")
    assert len(keyword) > 1 and criteria.keyword_ids[0].tolist() == keyword

    # Id match: the generated ids end with the keyword's own ids ("▁", "##", "#").
    gen = sp.encode("A red circle. ###")
    assert gen[-len(keyword):] == keyword
    assert criteria(torch.tensor([prompt + gen]), None).tolist() == [True]
    # Text match: "###" right after "." tokenizes without the "▁", so only the decoded text contains it.
    gen = sp.encode("A red circle.###")
    assert gen[-len(keyword):] != keyword
    assert criteria(torch.tensor([prompt + gen]), None).tolist() == [True]
    # Not yet: one "#" short.
    assert criteria(torch.tensor([prompt + gen[:-1]]), None).tolist() == [False]


def test_does_not_stop_on_the_prompt(tokenizer):
    prompt = _ids(tokenizer, "USER: hi ASSISTANT: hello</s>USER: and? ###")
    assert prompt[-1] != EOS
    prompt_eos = prompt + [EOS]
    criteria = KeywordsStoppingCriteria(["###", "</s>"], tokenizer, torch.tensor([prompt_eos]))
    assert criteria(torch.tensor([prompt_eos]), None).tolist() == [False]  # nothing generated yet
    one = _ids(tokenizer, "A")[1:]
    assert len(one) == 1
    assert criteria(torch.tensor([prompt_eos + one]), None).tolist() == [False]


def test_per_row_flags(tokenizer):
    prompts = [_ids(tokenizer, "USER: What is it? ASSISTANT:"), _ids(tokenizer, "USER: Describe it. ASSISTANT:")]
    width = max(map(len, prompts))
    # Left-padded prompt batch, as batched generation uses (pad = unk = 0).
    batch_prompt = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    criteria = KeywordsStoppingCriteria(["</s>"], tokenizer, batch_prompt)
    n = 6
    gen_a = (_ids(tokenizer, "A circle and a square")[1:])[: n - 1] + [EOS]  # row 0 has just emitted EOS
    gen_b = (_ids(tokenizer, "A big blue circle next to a square")[1:])[:n]  # row 1 is still going
    assert len(gen_a) == len(gen_b) == n and EOS not in gen_b
    out = criteria(torch.cat([batch_prompt, torch.tensor([gen_a, gen_b])], dim=1), None)
    assert out.dtype == torch.bool and out.shape == (2,)
    assert out.tolist() == [True, False]
    both = torch.cat([batch_prompt, torch.tensor([gen_a, gen_b[:-1] + [EOS]])], dim=1)
    assert criteria(both, None).tolist() == [True, True]
