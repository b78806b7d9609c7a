"""Worker loss on Beam's multi-process runner: one SDK worker process SIGKILLed mid-run
under `--direct_running_mode multi_processing`. Beam's portable runner does not retry the
bundle; the command then fails with exit status 3 and one line saying the output is
incomplete, with no manifest — never exit 0 with less. The same command run again ends
equal to a clean run. A row in the fault matrix."""

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.faults.matrix import account

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MULTI = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def _sdk_workers(parent: int) -> list[int]:
    """The Python SDK worker processes under `parent` (not the shells that start them)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    found, stack = [], [parent]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"apache_beam.runners.worker.sdk_worker_main" in argv and not argv[0].endswith(b"sh"):
                found.append(child)
    return found


def test_a_lost_worker_process_fails_the_run_loudly_and_the_rerun_is_whole(tmp_path):
    from pipelines import build_entity_index, select_candidates
    from pipelines.demo_data.make_corpus import write_corpus

    data = write_corpus(str(tmp_path / "data"))
    build_entity_index.run(["--entities", data["entities"], "--output", str(tmp_path / "index")])

    def args(out):
        return ["--entity_index", str(tmp_path / "index"), "--captions", data["webdataset"], "--caption_format", "webdataset",
                "--output", str(out)]

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.select_candidates", *args(out), *MULTI], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, victim, seen = time.time() + 240, None, None
    while proc.poll() is None and time.time() < deadline and victim is None:
        # Both workers up and the job at work on the output (its first sink has written).
        workers = _sdk_workers(proc.pid)
        if len(workers) >= 2 and seen is None and glob.glob(str(out / "**" / "beam-temp-*"), recursive=True):
            seen = time.time()
        if seen is not None and time.time() - seen > 0.5:
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.1)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run hung after a worker process was killed")
    assert victim is not None, "the run ended before a worker could be killed: give it more input"
    assert proc.returncode == 3, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: a worker process of the run was lost mid-run") and "run the same command again" in last
    assert not (out / "manifest.json").exists()

    again = select_candidates.run([*args(out), *MULTI])
    clean = select_candidates.run(args(tmp_path / "clean"))
    assert again["count_check"] == clean["count_check"] == "ok"
    got = sorted((r["key"], r["qid"]) for r in pq.read_table(glob.glob(str(out / "candidates-*.parquet")), columns=["key", "qid"]).to_pylist())
    want = sorted((r["key"], r["qid"]) for r in pq.read_table(glob.glob(str(tmp_path / "clean" / "candidates-*.parquet")),
                                                                columns=["key", "qid"]).to_pylist())
    assert got == want and len({k for k, _ in got}) == len(got)
    left = [x for d, dirs, files in os.walk(out) for x in dirs + files if x.startswith("beam-temp-")]
    assert not left, left
    row = account("worker_process_killed_rerun", "select_candidates", {k: "corpus" for k, _ in want}, [k for k, _ in got], [])
    assert row["lost"] == row["duplicated"] == 0
