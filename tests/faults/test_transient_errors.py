"""Errors of the environment are retried, never turned into rejects; errors of the data
are rejected once. `flaky://` paths fail the first open of every file (see flaky_fs)."""

import glob
import os

import pyarrow.parquet as pq
import pytest

from pipelines import select_candidates
from tests.faults.flaky_fs import PREFIX, FlakyFileSystem
from tests.faults.matrix import account
from tests.helpers import draw_image, read_rejects, write_webdataset
from transforms.formats.files import is_data_error
from transforms.io.retry import retry_call

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

CAPTIONS = ["Eiffel Tower at night", "Statue of Liberty from the ferry", "Taj Mahal at dawn", "Mona Lisa in the Louvre"]


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for t in range(2):
        samples = [{"key": f"{t}{i:03d}", "jpg": draw_image(10 * t + i), "txt": c} for i, c in enumerate(CAPTIONS)]
        write_webdataset(folder / f"0000{t}.tar", samples)
    # A corrupt file: a data error, rejected once.
    (folder / "00002.tar").write_bytes(b"this is not a tar archive at all" * 40)
    return folder


def _rows(out):
    return sorted((r["key"], r["qid"], r["image"]) for r in pq.read_table(glob.glob(str(out / "candidates-*.parquet"))).to_pylist())


def test_a_filesystem_that_fails_once_loses_nothing(tmp_path, entity_index):
    corpus = _corpus(tmp_path)
    base = ["--entity_index", entity_index, "--caption_format", "webdataset", "--k", "50", "--min_score", "-1", "--per_caption_entities", "1"]
    plain = select_candidates.run([*base, "--captions", str(corpus / "*.tar"), "--output", str(tmp_path / "plain")])
    FlakyFileSystem.reset(fail_times=1)
    flaky = select_candidates.run([*base, "--captions", PREFIX + str(corpus / "*.tar"), "--output", str(tmp_path / "flaky")])
    # Only the corrupt tar makes the run incomplete, the same way in both runs.
    assert flaky["count_check"] == plain["count_check"] and flaky["incomplete_files"] == {"read_captions_broken_archive": 1}
    assert _rows(tmp_path / "flaky") == _rows(tmp_path / "plain") != []
    # Every file failed once and was opened again; none of it became a reject.
    assert flaky["counters"]["io_retries"] >= 3
    assert len(FlakyFileSystem.opened) > len(set(FlakyFileSystem.opened))
    reasons = sorted(r["reason"] for r in read_rejects(tmp_path / "flaky"))
    assert reasons == sorted(r["reason"] for r in read_rejects(tmp_path / "plain"))
    assert reasons.count("broken_archive") == 1  # the corrupt tar, once
    assert not any("flaky" in (r["detail"] or "") for r in read_rejects(tmp_path / "flaky"))
    planted = {f"0000{t}/{t}{i:03d}": PREFIX + str(corpus / f"0000{t}.tar") for t in range(2) for i in range(len(CAPTIONS))}
    keys = [r["key"] for r in pq.read_table(glob.glob(str(tmp_path / "flaky" / "candidates-*.parquet"))).to_pylist()]
    row = account("filesystem_error_once", "select_candidates", planted, keys, read_rejects(tmp_path / "flaky"))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] + row["rejected"] == len(planted)


def test_an_environment_error_that_persists_fails_the_run_instead_of_rejecting(tmp_path, entity_index, monkeypatch):
    monkeypatch.setattr("transforms.io.retry.IO_RETRY_DELAY_S", 0.01)
    corpus = _corpus(tmp_path)
    FlakyFileSystem.reset(fail_times=100)
    with pytest.raises(Exception, match="flaky: connection reset"):
        select_candidates.run(["--entity_index", entity_index, "--caption_format", "webdataset",
                               "--captions", PREFIX + str(corpus / "*.tar"), "--output", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_error_classes():
    import gzip
    import json
    import tarfile
    import zlib

    import pyarrow as pa

    data = [tarfile.ReadError("bad"), EOFError(), zlib.error(), gzip.BadGzipFile(), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"),
            json.JSONDecodeError("x", "doc", 0), pa.ArrowInvalid("Parquet magic bytes not found"), ValueError("x")]
    env = [OSError("reset"), ConnectionResetError(), TimeoutError(), MemoryError(), FileNotFoundError("gone"), RuntimeError("x")]
    assert all(is_data_error(e) for e in data) and not any(is_data_error(e) for e in env)
    calls = []

    def sometimes():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("again")
        return "ok"

    assert retry_call(sometimes, "x") == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry_call(lambda: (calls.append(1), int("x")), "x")  # a data error: no retry
