"""Image decoding: every accepted format and mode comes out as RGB with orientation applied;
every kind of bad image raises ImageError with a stable reason."""

import io

import numpy as np
import pytest
from PIL import Image

from transforms.io.images import ImageError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(size=(40, 30)) -> Image.Image:
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]
    arr[..., 1] = np.linspace(0, 255, h)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp")])
def test_formats_detected_by_content(fmt, ext):
    decoded = decode_image(encode(gradient(), fmt))
    assert decoded.format == fmt and decoded.extension == ext
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == (40, 30)


def test_cmyk_jpeg_to_rgb():
    cmyk = gradient().convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95))
    ref = np.asarray(cmyk.convert("RGB"), np.int16)
    got = np.asarray(decoded.image, np.int16)
    assert decoded.image.mode == "RGB" and np.abs(got - ref).mean() < 8


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.paste(1, (5, 0, 10, 10))
    data = encode(img, "PNG", transparency=0)
    px = decode_image(data).image
    assert px.getpixel((0, 0)) == (255, 255, 255)  # transparent red -> white
    assert px.getpixel((7, 5)) == (0, 0, 255)


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_image(encode(rgba, "PNG")).image.getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert decode_image(encode(la, "PNG")).image.getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_grayscale_is_scaled():
    arr = np.tile(np.linspace(1000, 60000, 16, dtype=np.uint16), (4, 1))
    img = Image.frombytes("I;16", (16, 4), arr.astype("<u2").tobytes())
    px = decode_image(encode(img, "PNG")).image
    row = [px.getpixel((x, 0))[0] for x in range(16)]
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row)


def test_grayscale_and_bilevel():
    assert decode_image(encode(Image.new("L", (3, 3), 77), "PNG")).image.getpixel((1, 1)) == (77, 77, 77)
    assert decode_image(encode(Image.new("1", (3, 3), 1), "PNG")).image.getpixel((1, 1)) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(data)
    assert decoded.frames == 3 and decoded.image.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    img = gradient((40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert (decoded.width, decoded.height) == (20, 40)


def test_draft_decodes_smaller_but_reports_the_stored_size():
    """A draft decode reads a 1/2, 1/4 or 1/8 scale that is still >= the asked size; the
    reported size stays the stored one, turned like the pixels; non-JPEGs are untouched."""
    img = gradient((1000, 480))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display: the displayed image is 480 x 1000
    full = decode_image(encode(img, "JPEG", quality=92, exif=exif.tobytes()))
    small = decode_image(encode(img, "JPEG", quality=92, exif=exif.tobytes()), draft=(224, 224))
    assert (full.width, full.height) == full.image.size == (480, 1000)
    assert (small.width, small.height) == (480, 1000)
    assert small.image.size == (240, 500)  # 1/2: 1/4 would make the short side 120 < 224
    # The same picture: the draft is close to a resize of the full decode.
    ref = np.asarray(full.image.resize(small.image.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small.image, dtype=np.float32) - ref).mean() < 3.0
    assert decode_image(encode(gradient((1000, 480)), "JPEG"), draft=(600, 600)).image.size == (1000, 480)
    png = decode_image(encode(gradient((1000, 480)), "PNG"), draft=(224, 224))
    assert png.image.size == (png.width, png.height) == (1000, 480)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_image"),
        (b"hello, I am a text file\n", "not_an_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not_an_image"),  # JPEG magic, no JPEG
    ],
)
def test_bad_bytes(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_corrupt_data_stream():
    rng = np.random.default_rng(0)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)), "PNG"))
    data[data.find(b"IDAT") + 20] ^= 0xFF
    with pytest.raises(ImageError) as e:
        decode_image(bytes(data))
    assert e.value.reason == "corrupt_image"


def test_truncated_files():
    for fmt in ("JPEG", "PNG"):
        data = encode(gradient((200, 200)), fmt)
        with pytest.raises(ImageError) as e:
            decode_image(data[: len(data) // 2])
        assert e.value.reason == "truncated_image", fmt


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (12000, 12000), 0), "PNG")  # 144 Mpx in a few kB
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.reason == "too_many_pixels" and "144000000" in e.value.detail
    with pytest.raises(ImageError):
        decode_image(encode(gradient((100, 100)), "PNG"), max_pixels=5000)


def test_unsupported_format():
    with pytest.raises(ImageError) as e:
        decode_image(encode(gradient(), "PPM"))
    assert e.value.reason == "unsupported_format"
