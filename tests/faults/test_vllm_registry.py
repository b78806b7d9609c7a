"""The vLLM pid registry (transforms/llm/vllm.py) on a hostile filesystem: a run folder
swapped for a symlink, a registry root another user prepared or left open, files that are
not pid files. `shutdown_vllm_servers()` must delete nothing outside the registry and signal
no process this run did not start; a server that is ours is still stopped."""

import logging
import os
import stat
import subprocess

import pytest

from transforms.llm import vllm as llm_vllm

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

RUN = "run-registry-test"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", None)
    monkeypatch.setenv(llm_vllm.REGISTRY_ENV, str(root))
    monkeypatch.setenv(llm_vllm.RUN_ENV, RUN)
    return root


@pytest.fixture
def sleepers():
    """Start `sleep` children (with this run's id in their environment unless told
    otherwise); whatever is left is killed at the end."""
    procs = []

    def start(run=RUN):
        env = {k: v for k, v in os.environ.items() if k != llm_vllm.RUN_ENV}
        if run:
            env[llm_vllm.RUN_ENV] = run
        procs.append(subprocess.Popen(["sleep", "600"], env=env))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _victim(tmp_path, pid):
    """A folder outside the registry holding files and a pid file of a live process."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "123.pid").write_text(str(pid))
    (victim / f"{pid}.pid").write_text(str(pid))
    return victim


def _listing(folder):
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir())


def test_symlinked_run_folder_deletes_nothing_and_signals_nothing(tmp_path, registry, sleepers, caplog):
    victim_proc = sleepers()
    victim = _victim(tmp_path, victim_proc.pid)
    before = _listing(victim)
    registry.mkdir(mode=0o700)
    os.symlink(victim, registry / RUN)
    with caplog.at_level(logging.WARNING):
        assert llm_vllm.shutdown_vllm_servers(grace_s=1) == []
    assert _listing(victim) == before
    assert victim_proc.poll() is None
    assert "not a plain folder" in caplog.text
    # Nor does a server start register into it.
    llm_vllm._register(victim_proc.pid)
    assert _listing(victim) == before


def test_symlinked_registry_root_is_refused(tmp_path, registry, sleepers):
    victim_proc = sleepers()
    victim = _victim(tmp_path, victim_proc.pid)
    (victim / RUN).mkdir(mode=0o700)
    (victim / RUN / f"{victim_proc.pid}.pid").write_text(str(victim_proc.pid))
    os.chmod(victim, 0o700)
    before = _listing(victim / RUN)
    os.symlink(victim, registry)
    assert llm_vllm.shutdown_vllm_servers(grace_s=1) == []
    assert _listing(victim / RUN) == before and victim_proc.poll() is None


@pytest.mark.parametrize("how", ["mode_0777", "other_owner", "group_readable_run_folder"])
def test_registry_open_to_others_is_refused(tmp_path, registry, sleepers, monkeypatch, caplog, how):
    proc = sleepers()
    run_folder = registry / RUN
    run_folder.mkdir(parents=True, mode=0o700)
    os.chmod(registry, 0o700)
    (run_folder / f"{proc.pid}.pid").write_text(str(proc.pid))
    if how == "mode_0777":
        os.chmod(registry, 0o777)
    elif how == "group_readable_run_folder":
        os.chmod(run_folder, 0o750)
    elif os.getuid() == 0:
        os.chown(registry, 65534, 65534)  # really another user's
    else:
        monkeypatch.setattr(llm_vllm, "_uid", lambda: os.getuid() + 1)  # we are that other user
    with caplog.at_level(logging.WARNING):
        assert llm_vllm.shutdown_vllm_servers(grace_s=1) == []
    assert "refusing" in caplog.text
    assert (run_folder / f"{proc.pid}.pid").exists() and proc.poll() is None


def test_registered_server_is_stopped_and_only_its_pid_file_removed(tmp_path, registry, sleepers):
    server, stranger = sleepers(), sleepers(run=None)
    llm_vllm._register(server.pid)
    run_folder = registry / RUN
    # The registry is created private.
    assert stat.S_IMODE(os.stat(registry).st_mode) == 0o700 and stat.S_IMODE(os.stat(run_folder).st_mode) == 0o700
    assert (run_folder / f"{server.pid}.pid").read_text() == str(server.pid)
    # Files that are not `<int>.pid` files of their own pid, and a pid file of a process
    # this run did not start, which is not signalled.
    others = {
        "notes.txt": str(server.pid),
        "abc.pid": str(server.pid),
        f"{server.pid}.pid.bak": str(server.pid),
        "999999.pid": f"{server.pid}",  # names one pid, holds another
        "424242.pid": "not a number",
    }
    for name, text in others.items():
        (run_folder / name).write_text(text)
    (run_folder / "31337.pid").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("31337")
    (run_folder / f"{stranger.pid}.pid").write_text(str(stranger.pid))
    assert llm_vllm.shutdown_vllm_servers(grace_s=5) == [server.pid]
    assert server.wait(10) is not None
    assert stranger.poll() is None
    left = {p.name for p in run_folder.iterdir()}
    assert left == set(others) | {"31337.pid"}
    assert (tmp_path / "elsewhere.txt").read_text() == "31337"
    assert all((run_folder / n).read_text() == t for n, t in others.items())


def test_a_pid_file_that_does_not_parse_is_left_alone(registry, sleepers):
    proc = sleepers()
    run_folder = registry / RUN
    llm_vllm._register(proc.pid)
    (run_folder / f"{proc.pid}.pid").write_text(f"{proc.pid}\x00garbage")
    assert llm_vllm.shutdown_vllm_servers(grace_s=1) == []
    assert (run_folder / f"{proc.pid}.pid").exists() and proc.poll() is None


def test_registry_root_is_private_per_user(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", None)
    monkeypatch.delenv(llm_vllm.REGISTRY_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert llm_vllm.registry_root() == f"/tmp/entityforge-vllm-{os.getuid()}"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert llm_vllm.registry_root() == str(runtime / "entityforge-vllm")
    os.chmod(runtime, 0o777)  # not private: not used
    assert llm_vllm.registry_root() == f"/tmp/entityforge-vllm-{os.getuid()}"
    monkeypatch.setenv(llm_vllm.REGISTRY_ENV, str(tmp_path / "mine"))
    assert llm_vllm.registry_root() == str(tmp_path / "mine")


def test_run_ids_never_leave_the_registry(tmp_path, registry, sleepers, monkeypatch):
    """A run id is a folder name, never a path: `../x` stays inside the registry."""
    monkeypatch.setenv(llm_vllm.RUN_ENV, "../escape")
    assert "/" not in llm_vllm._run_name()
    proc = sleepers(run=llm_vllm._run_name())  # what the server's environment carries
    llm_vllm._register(proc.pid)
    assert not (tmp_path / "escape").exists()
    assert [p.parent.parent for p in registry.rglob("*.pid")] == [registry]
    assert llm_vllm.shutdown_vllm_servers(grace_s=5) == [proc.pid]
    assert proc.wait(10) is not None
