"""TFRecord files: u64 length, masked CRC32C of the length, payload, masked CRC32C of the
payload. Frames are checked, never trusted."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from transforms.formats.files import Skip

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecord.gz", ".tfrecords", ".tfrecords.gz")


def is_tfrecord(path: str) -> bool:
    p = path.lower()
    # Beam names shards `<prefix>-SSSSS-of-NNNNN.tfrecord`; other tools `x.tfrecord-00000-of-...`.
    return p.endswith(TFRECORD_SUFFIXES) or ".tfrecord-" in p


def masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    """One TFRecord frame around `payload`."""
    head = struct.pack("<Q", len(payload))
    return head + struct.pack("<I", masked_crc(head)) + payload + struct.pack("<I", masked_crc(payload))


def iter_tfrecord(stream) -> Iterator[bytes | Skip]:
    """Payloads of a TFRecord stream; a bad data CRC skips one record, a bad length CRC or a
    cut-off file ends the file (the framing is lost), each reported as a Skip."""
    while True:
        head = stream.read(12)
        if not head:
            return
        if len(head) < 12:
            yield Skip("tfrecord_truncated", "file ends inside a record header")
            return
        (length,) = struct.unpack("<Q", head[:8])
        (length_crc,) = struct.unpack("<I", head[8:])
        if masked_crc(head[:8]) != length_crc:
            yield Skip("tfrecord_bad_length_crc", "record framing lost; rest of the file skipped")
            return
        data = stream.read(length)
        tail = stream.read(4)
        if len(data) < length or len(tail) < 4:
            yield Skip("tfrecord_truncated", "file ends inside a record")
            return
        if masked_crc(data) != struct.unpack("<I", tail)[0]:
            yield Skip("tfrecord_bad_crc", "record payload does not match its CRC")
            continue
        yield data


def count_frames(stream) -> int:
    """Frames of a TFRecord stream, walking the headers only: each length is checked
    against its CRC and the payload skipped by seeking (read and dropped when the stream
    cannot seek), so counting a shard of images costs a header read per record, not a
    second read of every image. A frame cut short by the end of the file is not counted."""
    import io

    try:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
    except (AttributeError, OSError, ValueError):
        size = None
    n, pos = 0, 0
    while True:
        head = stream.read(12)
        if len(head) < 12:
            return n
        (length,) = struct.unpack("<Q", head[:8])
        if masked_crc(head[:8]) != struct.unpack("<I", head[8:])[0]:
            return n
        pos += 12 + length + 4
        if size is not None:
            if pos > size:
                return n
            stream.seek(pos)
        else:
            skipped = stream.read(length + 4)
            if len(skipped) < length + 4:
                return n
        n += 1
