"""What a failed run leaves is removed by the next one, and only that: Beam's temporary
folders (with their partial shards), our shards and reject shards, the manifest and the
`_written` lists; a user's other files in the same folder stay. A full disk is reported
in one line with exit status 1, whatever wraps the OSError."""

import errno
import os

import pytest

from transforms.errors import NoSpaceError, UsageError, no_space
from transforms.run.cli import exit_code
from transforms.run.manifest import prepare_output

HEX = "50451d2af07611f1bdd702fc00000001"


def _touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_a_rerun_removes_what_the_failed_run_left_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    ours = [f"beam-temp-samples-{HEX}/partial-shard.parquet", f"rejected/decontaminate/beam-temp-rejects-{HEX}/a.jsonl",
            f"eval_set/beam-temp-thumbnails-{HEX}/t.parquet", "samples-00001-of-00004.parquet",
            "rejected/decontaminate/rejects-00000-of-00001.jsonl", "_written/samples.json", f"_written/beam-temp-samples-{HEX}/s.json", "manifest.json"]
    users = ["notes.txt", "beam-temp-my-own-folder/keep.txt", f"beam-temp-samples-{HEX[:-1]}/keep.txt",
             "samples-final.parquet", "rejected/decontaminate/my-notes.jsonl", f"data/deeper/more/beam-temp-x-{HEX}/keep.txt"]
    for p in ours + users:
        _touch(str(out / p))
    removed = prepare_output(str(out), ("samples",))
    assert all(not (out / p).exists() for p in ours), [p for p in ours if (out / p).exists()]
    assert all((out / p).exists() for p in users), [p for p in users if not (out / p).exists()]
    assert not any(os.path.basename(r).startswith("beam-temp-") and "keep" in r for r in removed)
    assert sum("beam-temp-" in r for r in removed) == 4


def test_a_full_disk_is_one_line_and_exit_1(capsys):
    def beam_like(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("OSError: [Errno 28] No space left on device [while running 'WriteShards/Write']") from e

    assert exit_code(beam_like, ["--input", "x", "--output", "/data/out"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: no space left on device writing /data/out: free space or choose another --output, then run the same command again")

    def text_only(argv):
        raise RuntimeError("worker failed: OSError: [Errno 28] No space left on device")

    assert exit_code(text_only, ["--output=gs://b/out"]) == 1
    assert "writing gs://b/out:" in capsys.readouterr().err

    def beam_named(argv):
        raise RuntimeError("OSError: [Errno 28] No space left on device: '/data/cache/seg-1.jsonl' [while running 'Ask']")

    assert exit_code(beam_named, ["--output", "/data/out"]) == 1
    assert "writing /data/cache/seg-1.jsonl:" in capsys.readouterr().err

    def named(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/checkpoints/.step-0000002.tmp/model.safetensors")

    assert exit_code(named, ["--output", "/data/out"]) == 1
    assert "writing /data/out/checkpoints/.step-0000002.tmp/model.safetensors:" in capsys.readouterr().err
    # Other errors are not taken for a full disk.
    assert exit_code(lambda a: (_ for _ in ()).throw(UsageError("--k must be >= 1")), []) == 2

    def other(argv):
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        exit_code(other, [])
    assert no_space(ValueError("nothing")) is None and isinstance(no_space(NoSpaceError("p")), NoSpaceError)
