"""Run a command as if the disk under one folder held only N bytes, for machines where a
test cannot mount a small tmpfs:

    python -m tests.faults.fill_disk N FOLDER MODULE [ARGS...]

Every file opened for writing under FOLDER through Python (`open`, `io.open`: Beam's
local filesystem, our JSON and cache writers) counts its bytes against one budget; the
write that goes past it raises OSError(ENOSPC) with the file's name, as a full disk does.
Writers in native code (safetensors, torch) are not seen: those tests need the tmpfs."""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys
import threading

_lock = threading.Lock()
_left = [0]


class _Counted(io.RawIOBase):
    def __init__(self, raw, name):
        super().__init__()
        self._raw, self.name = raw, name

    def write(self, data):
        n = len(data)
        with _lock:
            if n > _left[0]:
                _left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            _left[0] -= n
        return self._raw.write(data)

    def __getattr__(self, attr):
        return getattr(self._raw, attr)

    def writable(self):
        return True

    def close(self):
        self._raw.close()
        super().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def install(limit: int, folder: str) -> None:
    _left[0] = limit
    folder = os.path.abspath(folder)
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+") and \
                os.path.abspath(os.fspath(file)).startswith(folder + os.sep):
            return _Counted(f, os.fspath(file))
        return f

    builtins.open = guarded
    io.open = guarded


def main() -> None:
    limit, folder, module, *argv = sys.argv[1:]
    install(int(limit), folder)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
