"""Which files and which webdataset members are images, and their MIME types."""

from __future__ import annotations

# Webdataset member extensions that hold an image, in the order a sample's image is
# chosen when it has several. "img" is what our writer uses for an unknown format.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jfif", "img")

# File names that are images (an evaluation folder, OVEN's image tree).
IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS if e != "img")

MIME_BY_EXTENSION = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "jfif": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def mime_type(extension: str | None, default: str = "image/jpeg") -> str:
    """MIME type of an image extension ("jpg", ".PNG"); `default` when unknown."""
    if not extension:
        return default
    return MIME_BY_EXTENSION.get(extension.lower().lstrip("."), default)


def image_member(parts: dict):
    """A webdataset sample's image member (bytes or a located reference), or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    return None
