"""A Beam FileSystem for `flaky://<local path>` that fails the first open of every file
with an OSError (a dropped connection, a 503 from an object store), then behaves: the
shape of transient errors on GCS. Registered by importing this module."""

from __future__ import annotations

import threading

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

PREFIX = "flaky://"


class FlakyFileSystem(LocalFileSystem):
    failures_left: dict[str, int] = {}
    fail_times = 1
    opened: list[str] = []
    _lock = threading.Lock()

    @classmethod
    def scheme(cls):
        return "flaky"

    @classmethod
    def reset(cls, fail_times: int = 1):
        with cls._lock:
            cls.failures_left = {}
            cls.fail_times = fail_times
            cls.opened = []

    @staticmethod
    def _local(path: str) -> str:
        return path[len(PREFIX):] if path.startswith(PREFIX) else path

    def _list(self, dir_or_prefix):
        for m in super()._list(self._local(dir_or_prefix)):
            yield FileMetadata(PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)

    def exists(self, path):
        return super().exists(self._local(path))

    def size(self, path):
        return super().size(self._local(path))

    def metadata(self, path):
        m = super().metadata(self._local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
        cls = type(self)
        with cls._lock:
            left = cls.failures_left.setdefault(path, cls.fail_times)
            cls.opened.append(path)
            if left > 0:
                cls.failures_left[path] = left - 1
                raise OSError(f"flaky: connection reset while opening {path}")
        return super().open(self._local(path), mime_type, compression_type)
