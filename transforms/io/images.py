"""The one guarded image decoder: every decode of data bytes (corpus images, evaluation
images, thumbnails of a card or viewer, images sent to an LLM) goes through here.

The format is found from the content, never from a file extension, and only among an
allow-list (JPEG, PNG, WebP, GIF, BMP, TIFF): Pillow is asked to try those plugins alone,
so no other plugin ever sees the bytes (EPS, which runs Ghostscript, cannot be reached).
Budgets are checked from the header, before any pixel is decoded: `max_pixels` (the
decompression-bomb guard) and `max_image_bytes`, the memory the decode and the conversion
to RGB take (pixels x the bytes per pixel of the stored mode and its conversion: a 16-bit
or alpha image costs more than an 8-bit RGB one). Frames of an animation are counted from
the container's structure, up to 64, without decoding a frame; the first frame is used.

Every image comes out as 8-bit RGB with its EXIF orientation applied: CMYK, palette,
16/32-bit, grayscale, 1-bit and alpha images are converted (alpha is composited on white,
as a viewer shows it). Truncated or corrupt files raise `ImageError` with a reason;
nothing else escapes.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
# The plugins Pillow may try on data bytes (MPO is opened by the JPEG plugin).
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (~9459 x 9459)
# Memory one decode may take (stored pixels plus the conversion to RGB): 1 GiB holds a
# 89-megapixel RGB JPEG, a 53-megapixel RGBA PNG or a 67-megapixel 16-bit one.
DEFAULT_MAX_IMAGE_BYTES = 1 << 30

# Peak bytes per pixel of decoding an image of a mode and converting it to RGB (Pillow
# keeps RGB in 4 bytes a pixel): the stored pixels, the converted copies alive at once,
# and an orientation copy. Unknown modes take the largest figure.
PEAK_BYTES_PER_PIXEL = {
    "RGB": 8, "L": 9, "1": 9, "P": 9, "CMYK": 12, "YCbCr": 12, "LAB": 12, "HSV": 12, "RGBX": 12,
    "RGBA": 20, "LA": 20, "PA": 20, "RGBa": 20, "La": 20,
    "I;16": 14, "I;16B": 14, "I;16L": 14, "I;16N": 14, "I": 22, "F": 22,
}
MAX_PEAK_BYTES_PER_PIXEL = 22
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class ImageError(ValueError):
    """A bad image: `reason` is a stable reject reason, `detail` the specifics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, orientation applied; smaller than width x height after a draft decode
    format: str  # container format as Pillow identified it from the bytes
    width: int  # the stored image's size, after orientation (not the draft's)
    height: int
    frames: int  # >1 for animations (the first frame is used)

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format, "img")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth grayscale: scale the actual range to 0..255. 16-bit pixels go
        # through a 65,536-entry table (1 byte a pixel out, no float copy of the image).
        arr = np.asarray(img)
        lo, hi = arr.min(), arr.max()
        if arr.dtype.itemsize <= 2 and arr.dtype.kind in "ui":
            values = np.arange(65_536, dtype=np.float64) + (np.iinfo(arr.dtype).min if arr.dtype.kind == "i" else 0)
            scale = 255.0 / (float(hi) - float(lo)) if hi > lo else 0.0
            lut = ((values - float(lo)) * scale).clip(0, 255).astype(np.uint8)
            index = arr.astype(np.uint16, copy=False) if arr.dtype.kind == "u" else (arr.astype(np.int32) - np.iinfo(arr.dtype).min)
            out = lut[index]
        else:
            work = arr.astype(np.float32)
            scale = 255.0 / (float(hi) - float(lo)) if hi > lo else 0.0
            work -= np.float32(lo)
            work *= np.float32(scale)
            out = work.clip(0, 255, out=work).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...: Pillow knows the conversion.
    return img.convert("RGB")


_PILLOW_LIMIT_LOCK = threading.Lock()


def _let_pillow_open(max_pixels: int) -> None:
    """Pillow refuses, at open, images over twice its global MAX_IMAGE_PIXELS, before our
    per-image guard sees the size. When `max_pixels` asks for more, the global limit is
    raised once, under a lock and never lowered, so threads decoding in parallel never see
    it toggled (the guard of each image is ours: `w * h > max_pixels`)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or 2 * limit >= max_pixels:
        return
    with _PILLOW_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


# Frames counted in an animation before it is called "many": only the first is used.
MAX_FRAMES_COUNTED = 64


def gif_frames(data: bytes, limit: int = MAX_FRAMES_COUNTED) -> int:
    """Frames of a GIF, counted from its block structure up to `limit`, without decoding
    any (Pillow's `n_frames` and `seek` decode every frame before the one asked for)."""
    n, size = 0, len(data)
    if size < 13:
        return 1
    i = 13
    flags = data[10]
    if flags & 0x80:
        i += 3 << ((flags & 7) + 1)
    while i < size and n < limit:
        block = data[i]
        if block == 0x2C:  # image descriptor: 9 bytes, a local colour table, LZW data
            n += 1
            if i + 10 > size:
                break
            flags = data[i + 9]
            i += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
        elif block == 0x21:  # extension: a label, then data sub-blocks
            i += 2
        else:  # the trailer, or bytes that are not a block: stop counting
            break
        while i < size:  # data sub-blocks, each led by its length, ended by a zero
            length = data[i]
            i += 1 + length
            if length == 0:
                break
    return max(1, n)


def _frames(img, data: bytes) -> int:
    """Frames of an animation, counted up to MAX_FRAMES_COUNTED without decoding frames (1
    for a still image). GIF from its block structure; APNG, WebP and MPO from the frame
    count their headers state; TIFF by walking its directories (no pixel data)."""
    if not getattr(img, "is_animated", False):
        return 1
    if img.format == "GIF":
        return gif_frames(data)
    if img.format == "TIFF":
        n = 1
        try:
            while n < MAX_FRAMES_COUNTED:
                img.seek(n)
                n += 1
        except EOFError:
            pass
        img.seek(0)
        return n
    return max(1, min(int(getattr(img, "n_frames", 1) or 1), MAX_FRAMES_COUNTED))


def sniff_format(data: bytes) -> Optional[str]:
    """The name of a format outside the allow-list whose signature the bytes start with
    (for the reject reason), or None. Only the plugins' signature checks run, on the
    first 64 bytes: no plugin opens the data."""
    head = bytes(data[:64])
    Image.init()
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in OPEN_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return fmt
        except Exception:  # noqa: BLE001 - a signature check that cannot judge 64 bytes
            continue
    return None


def peak_bytes(mode: str, width: int, height: int) -> int:
    """Memory a decode of an image of this mode and size takes, converted to RGB."""
    return width * height * PEAK_BYTES_PER_PIXEL.get(mode, MAX_PEAK_BYTES_PER_PIXEL)


def _open(data: bytes):
    """Pillow's image object for the bytes, trying the allow-listed plugins only."""
    return Image.open(io.BytesIO(data), formats=OPEN_FORMATS)


def probe_size(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header only; ImageError if not an image."""
    try:
        with _open(data) as img:
            return img.size[0], img.size[1], img.format or "?"
    except UnidentifiedImageError as e:
        other = sniff_format(data)
        raise ImageError("unsupported_format" if other else "not_an_image", f"format {other}" if other else str(e)[:200]) from e
    except Exception as e:  # noqa: BLE001
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}"[:300]) from e


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: Optional[tuple[int, int]] = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> DecodedImage:
    """Decode by content (see the module docstring). `draft=(w, h)` lets a JPEG decode at a
    reduced scale (1/2, 1/4 or 1/8, in the DCT domain) that is still at least that size:
    much faster for model inputs that are resized down anyway, and the memory budget is
    that of the reduced image. `width` / `height` are the stored image's size either way."""
    if data is None or len(data) == 0:
        raise ImageError("empty_image", "no image bytes")
    try:
        _let_pillow_open(max_pixels)
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) below its hard limit; our guard decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = _open(data)
            except Image.DecompressionBombError as e:
                # Over twice Pillow's limit, which is at least max_pixels / 2: ours refuses too.
                raise ImageError("too_many_pixels", f"{e}"[:300] + f" (> --max_pixels {max_pixels})") from e
            fmt = img.format or "?"
            if fmt not in ACCEPTED_FORMATS:
                raise ImageError("unsupported_format", f"format {fmt}")
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("empty_image", f"size {w}x{h}")
            if w * h > max_pixels:
                raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels > --max_pixels {max_pixels}")
            frames = _frames(img, data)
            if draft is not None and fmt in ("JPEG", "MPO"):
                img.draft("RGB", draft)
            cost = peak_bytes(img.mode, *img.size)
            if cost > max_image_bytes:
                raise ImageError(
                    "too_many_bytes",
                    f"{img.size[0]}x{img.size[1]} {img.mode} takes ~{cost:,} bytes to decode > --max_image_bytes {max_image_bytes:,}",
                )
            img.load()
            loaded = img.size
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            rgb.load()
            # The stored size, turned as the orientation turned the pixels.
            turned = rgb.size != loaded
            width, height = (h, w) if turned else (w, h)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        other = sniff_format(data)
        if other:
            raise ImageError("unsupported_format", f"format {other}") from e
        raise ImageError("not_an_image", str(e)[:200]) from e
    except MemoryError:
        raise  # the machine's, not the image's: retried by the runner
    except RecursionError as e:
        raise ImageError("corrupt_image", "RecursionError while decoding") from e
    except OSError as e:
        text = str(e)
        reason = "truncated_image" if "truncated" in text.lower() else "corrupt_image"
        raise ImageError(reason, text[:300]) from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on hostile input
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}"[:300]) from e
    return DecodedImage(rgb, fmt, width, height, frames)


# What current VLM endpoints accept as image parts without conversion.
LLM_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
DEFAULT_LLM_MAX_SIDE = 512


def image_for_llm(data: bytes, max_side: int = DEFAULT_LLM_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """(bytes, MIME type) of an image as it is sent to a multimodal LLM.

    An image whose longer side is at most `max_side`, in a format endpoints accept (JPEG,
    PNG, WebP), is sent as it is. A larger one is downscaled (aspect kept, its EXIF
    orientation applied) and sent as JPEG quality 90; GIF/BMP/TIFF are converted to JPEG
    too. Current VLMs see at most ~1-2 megapixels (Qwen2.5-VL's default budget, GPT-4o's
    high-detail tiles, Gemini's 768 px tiles), so a larger image costs transfer and image
    tokens for nothing. `max_side` 0 sends every image unchanged. The LLM cache key is
    computed on the bytes this returns.
    """
    if max_side <= 0:
        return data, _mime_of(data)
    width, height, fmt = probe_size(data)  # the stored size: a draft decode may be smaller
    mime = LLM_MIME.get(fmt)
    decoded = decode_image(data, max_pixels, draft=(max_side, max_side))
    if mime is not None and max(width, height) <= max_side and decoded.frames == 1:
        return data, mime
    img = decoded.image
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


# A reject's thumbnail (decontaminate --reject_thumbnails): small enough that keeping one
# with every reject costs little (measured on the demo: docs/decontaminate.md).
REJECT_THUMB_SIDE = 128
REJECT_THUMB_MAX_BYTES = 8192


def small_jpeg(data: bytes, side: int = REJECT_THUMB_SIDE, max_bytes: int = REJECT_THUMB_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[bytes]:
    """A JPEG of at most `side` px and `max_bytes` bytes of an image (through the guarded
    decoder, at reduced scale), or None when the image does not decode or no quality fits."""
    try:
        img = decode_image(data, max_pixels, draft=(side, side)).image
    except ImageError:
        return None
    img.thumbnail((side, side))
    for quality in (75, 50, 30):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
    return None


def data_url(jpeg: Optional[bytes]) -> Optional[str]:
    import base64

    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _mime_of(data: bytes) -> str:
    try:
        return LLM_MIME.get(probe_size(data)[2], "image/jpeg")
    except ImageError:
        return "image/jpeg"
