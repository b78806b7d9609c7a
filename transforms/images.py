"""Robust image decoding with Pillow.

The format is found from the content, never from a file extension. Accepted: JPEG, PNG,
WebP, GIF, BMP (and TIFF). Every image comes out as 8-bit RGB with its EXIF orientation
applied: CMYK, palette, 16/32-bit, grayscale, 1-bit and alpha images are converted (alpha is
composited on white, as a viewer shows it), animated images give their first frame.
A decompression-bomb guard refuses images with more than `max_pixels` pixels before
decoding them. Truncated or corrupt files raise `ImageError` with a reason; nothing else
escapes.
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
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (~9459 x 9459)
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
        # High bit depth grayscale: scale the actual range to 0..255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
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


# Frames counted in an animation before it is called "many": Pillow's n_frames walks every
# frame of a GIF (a 100,000-frame GIF is a cheap denial of service); only the first is used.
MAX_FRAMES_COUNTED = 64


def _frames(img) -> int:
    """Frames of an animation, counted up to MAX_FRAMES_COUNTED (1 for a still image)."""
    if not getattr(img, "is_animated", False):
        return 1
    n = 1
    try:
        while n < MAX_FRAMES_COUNTED:
            img.seek(n)
            n += 1
    except EOFError:
        pass
    return n


def probe_size(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header only; ImageError if not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0], img.size[1], img.format or "?"
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", str(e)[:200]) from e
    except Exception as e:  # noqa: BLE001
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}"[:300]) from e


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: Optional[tuple[int, int]] = None) -> DecodedImage:
    """Decode by content (see the module docstring). `draft=(w, h)` lets a JPEG decode at a
    reduced scale (1/2, 1/4 or 1/8, in the DCT domain) that is still at least that size:
    much faster for model inputs that are resized down anyway. `width` / `height` are the
    stored image's size either way."""
    if data is None or len(data) == 0:
        raise ImageError("empty_image", "no image bytes")
    try:
        _let_pillow_open(max_pixels)
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) below its hard limit; our guard decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
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
            frames = _frames(img)
            if frames > 1:
                img.seek(0)
            if draft is not None and fmt == "JPEG":
                img.draft("RGB", draft)
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
        raise ImageError("not_an_image", str(e)[:200]) from e
    except OSError as e:
        text = str(e)
        reason = "truncated_image" if "truncated" in text.lower() else "corrupt_image"
        raise ImageError(reason, text[:300]) from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on hostile input
        raise ImageError("corrupt_image", f"{type(e).__name__}: {e}"[:300]) from e
    return DecodedImage(rgb, fmt, width, height, frames)


# What current VLM endpoints accept as image parts without conversion.
LLM_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
DEFAULT_LLM_MAX_SIDE = 1024


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


def _mime_of(data: bytes) -> str:
    try:
        return LLM_MIME.get(probe_size(data)[2], "image/jpeg")
    except ImageError:
        return "image/jpeg"
