"""Small hostile files, each a reproduction of a finding of the security review: an EPS
named .jpg (reaches Ghostscript through Pillow), decompression bombs of several shapes,
deeply nested JSON, archives whose few kilobytes expand to gigabytes. Written in code, so
the suite needs no fixtures on disk; the large ones stream their zeros."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MIB = 1 << 20

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)


def install_fake_gs(folder) -> tuple[str, str]:
    """A stand-in `gs` in `folder` that records each call in `folder/gs_calls`.
    Returns (the folder to put first on PATH, the record file)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    record = os.path.join(folder, "gs_calls")
    script = os.path.join(folder, "gs")
    with open(script, "w") as f:
        # Answers Pillow's `gs --version` probe like a real Ghostscript, records every call,
        # and fails the rendering call (nothing is run).
        f.write(f'#!/bin/sh\necho "$@" >> "{record}"\n[ "$1" = "--version" ] && echo 10.02.1 && exit 0\nexit 1\n')
    os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder, record


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def big_png() -> bytes:
    """13000 x 13000 RGB (169 megapixels) in ~0.5 MB: over the default --max_pixels."""
    return _encode(Image.new("RGB", (13000, 13000)), "PNG")


def png16() -> bytes:
    """9000 x 9000 16-bit grayscale in ~160 kB: within --max_pixels, over the byte budget
    (~1.1 GB to decode and convert)."""
    return _encode(Image.new("I;16", (9000, 9000)), "PNG")


def gif_64_frames(side: int = 2000) -> bytes:
    """64 frames of side x side (the review's had 4000: 0.9 MB, 6.7 s when every frame was
    decoded to count them; 2000 keeps the suite quick and the point the same)."""
    frames = [Image.new("P", (side, side), i) for i in range(64)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def nested_json(depth: int = 100_000) -> bytes:
    return b"[" * depth


class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def tar_of(path, members: list[tuple[str, bytes]], mode: str = "w") -> str:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def tar_gz_one_big_sample(path, members: int = 24, size: int = 60 * MIB) -> str:
    """One sample (`big.*`) of `members` members of `size` zero bytes, gzip-compressed to
    ~1.5 MB; a caption of its own so the sample is otherwise usable."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        info = tarfile.TarInfo("big.txt")
        caption = b"Eiffel Tower at night"
        info.size = len(caption)
        tar.addfile(info, io.BytesIO(caption))
        for i in range(members):
            info = tarfile.TarInfo(f"big.m{i:02d}")
            info.size = size
            tar.addfile(info, io.BufferedReader(_Zeros(size)))
    return str(path)


def sparse_tar(path, folder, members: int = 24, size: int = 60 * MIB) -> str:
    """A plain GNU tar of sparse members (all holes): ~20 kB that expands to
    members x size bytes when read."""
    os.makedirs(folder, exist_ok=True)
    for i in range(members):
        with open(os.path.join(folder, f"s{i:02d}.txt"), "wb") as f:
            f.truncate(size)
    names = sorted(os.listdir(folder))
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(folder), *names], check=True)
    return str(path)


def many_members_tar_gz(path, n: int = 300_000) -> str:
    """`n` one-byte members, gzip-compressed to ~2 MB."""
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        info = tarfile.TarInfo()
        for i in range(n):
            info.name = f"m{i:06d}.txt"
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return str(path)


def laion_huge_caption(path, size: int = 255 * MIB) -> str:
    """A LAION metadata Parquet with one `size`-character caption, zstd-compressed to a
    few tens of kB, beside two ordinary rows."""
    table = pa.table({
        "URL": ["http://x/ok0.jpg", "http://x/huge.jpg", "http://x/ok1.jpg"],
        "TEXT": ["Eiffel Tower at night", "a" * size, "Taj Mahal at dawn"],
    })
    pq.write_table(table, path, compression="zstd")
    return str(path)


def catalog_huge_line(path, size: int = 1 << 30) -> str:
    """A gzip catalog of two ordinary lines around one `size`-byte line (~1 MB on disk)."""
    ok = [{"wikidata_id": "Q901", "wikipedia_title": "Thing one"}, {"wikidata_id": "Q902", "wikipedia_title": "Thing two"}]
    chunk = b"x" * MIB
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(json.dumps(ok[0]).encode() + b"\n")
        f.write(b'{"wikidata_id": "Q903", "wikipedia_title": "Huge", "wikipedia_summary": "')
        for _ in range(size // MIB):
            f.write(chunk)
        f.write(b'"}\n')
        f.write(json.dumps(ok[1]).encode() + b"\n")
    return str(path)
