"""A full disk on the writers: the run stops with exit status 1 and, as its last line, one
line naming the path, the cause and how to go on; no manifest claims the run; the re-run
after space was freed ends like a clean run, and no `beam-temp-*` folder or partial shard
of the failed run is left in the output.

The small filesystem is a tmpfs the test mounts where the machine allows it (root in a
container, as on CI); elsewhere the command runs under `tests/faults/fill_disk.py`, which
makes every write under the output fail with ENOSPC after a byte budget, through the same
file objects Beam's local filesystem and the trainer use."""

import glob
import importlib
import io
import json
import os
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.faults.matrix import account, account_counts
from tests.helpers import read_rejects, write_webdataset

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = 1 << 20  # 1 MiB: every writer below needs more
ARCH = "ViT-S-32"


def _noise_jpeg(seed: int, side: int = 160) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class SmallDisk:
    """A folder that holds `SMALL` bytes, then `grow()` frees space."""

    def __init__(self, path, size: int = SMALL):
        self.path, self.size = str(path), size
        os.makedirs(self.path, exist_ok=True)
        self.mounted = False
        if not os.environ.get("EF_TEST_NO_TMPFS"):  # set it to try the fallback where mounting works
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path], capture_output=True)
            self.mounted = proc.returncode == 0

    def fails_with_one_line(self, module: str, argv: list[str], out: str, capfd, flag: str = "--output",
                            manifest_in: str = "") -> None:
        """The command on the small disk: exit status 1, and its last line on stderr the one
        line. In this process on the tmpfs (as `python -m MODULE` runs it: `exit_code`);
        in a process of its own under fill_disk.py otherwise."""
        if self.mounted:
            from transforms.run.cli import exit_code

            capfd.readouterr()
            code = exit_code(importlib.import_module(module).run, argv)
            stderr = capfd.readouterr().err
        else:
            proc = subprocess.run([sys.executable, "-m", "tests.faults.fill_disk", str(self.size), self.path, module, *argv],
                                  capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
            code, stderr = proc.returncode, proc.stderr
        assert code == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on device writing {out}"), stderr[-3000:]
        assert last.endswith(f": free space or choose another {flag}, then run the same command again"), last
        assert not os.path.exists(os.path.join(manifest_in or out, "manifest.json"))

    def grow(self):
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", self.path], check=True)

    def close(self):
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], check=False)


@pytest.fixture
def disk(tmp_path):
    d = SmallDisk(tmp_path / "small")
    yield d
    d.close()


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT)


def _no_leftovers(out: str):
    left = [os.path.join(d, x) for d, dirs, files in os.walk(out) for x in dirs + files if x.startswith("beam-temp-")]
    assert not left, left


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """54 samples of incompressible images (~2.5 MB of shards in any format), with their
    entity, as img2dataset writes them; an evaluation set with a copy of one."""
    folder = tmp_path_factory.mktemp("disk_full_corpus")
    meta = {"qid": "Q243", "title": "Eiffel Tower", "score": 0.7, "rank": 1, "entity_id": 0}
    images = [_noise_jpeg(i) for i in range(54)]
    for t in range(3):
        write_webdataset(folder / f"{t:05d}.tar", [
            {"key": f"{t:05d}{i:04d}", "jpg": images[t * 18 + i], "txt": f"caption {i}",
             "json": {"key": f"{t:05d}{i:04d}", "url": f"http://x/{t}/{i}.jpg", "caption": f"caption {i}", **meta}}
            for i in range(18)])
    evals = folder / "eval"
    evals.mkdir()
    (evals / "copy.jpg").write_bytes(images[0])
    import open_clip
    import torch

    torch.manual_seed(123)
    model, _, _ = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    torch.save(model.state_dict(), folder / "clip.pt")
    return folder


def _decontaminate_args(corpus, out, fmt):
    return ["--input", str(corpus / "*.tar"), "--eval_images", str(corpus / "eval"), "--output", str(out),
            "--clip_model", ARCH, "--clip_pretrained", str(corpus / "clip.pt"), "--threshold", "0.9999",
            "--formats", fmt, "--num_shards", "2"]


def _written(out) -> dict:
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {k: v for k, v in m["counters"].items() if not k.startswith("shuffle_")}


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord", "webdataset"])
def test_decontaminate_shards_on_a_full_disk(tmp_path, disk, corpus, fmt, capfd):
    from pipelines import decontaminate

    out = os.path.join(disk.path, "shards")
    disk.fails_with_one_line("pipelines.decontaminate", _decontaminate_args(corpus, out, fmt), out, capfd)
    disk.grow()
    again = decontaminate.run(_decontaminate_args(corpus, out, fmt))
    clean = decontaminate.run(_decontaminate_args(corpus, tmp_path / "clean", fmt))
    assert again["count_check"] == clean["count_check"] == "ok"
    assert _written(out) == _written(tmp_path / "clean")
    _no_leftovers(out)
    rejects = read_rejects(out)
    if fmt == "parquet":
        keys = pq.read_table(sorted(glob.glob(f"{out}/samples-*.parquet")), columns=["key"]).column("key").to_pylist()
        planted = {f"{t:05d}/{t:05d}{i:04d}": str(corpus / f"{t:05d}.tar") for t in range(3) for i in range(18)}
        row = account("disk_full_rerun", "decontaminate[parquet]", planted, keys, rejects)
    else:
        row = account_counts("disk_full_rerun", f"decontaminate[{fmt}]", 54, again["counters"][f"written_samples_{fmt}"],
                             [r for r in rejects if r["reason"] == "near_duplicate_of_eval"])
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == 53


def test_select_candidates_on_a_full_disk(tmp_path, disk, corpus, entity_index, capfd):
    """Candidates carry their images: the candidates and rejects writers fill the disk."""
    from pipelines import select_candidates

    def args(out):
        return ["--entity_index", entity_index, "--captions", str(corpus / "*.tar"), "--caption_format", "webdataset",
                "--k", "100", "--min_score", "-1", "--output", str(out)]

    out = os.path.join(disk.path, "candidates")
    disk.fails_with_one_line("pipelines.select_candidates", args(out), out, capfd)
    disk.grow()
    again = select_candidates.run(args(out))
    clean = select_candidates.run(args(tmp_path / "clean"))
    assert again["count_check"] == clean["count_check"] == "ok"
    _no_leftovers(out)
    keys = pq.read_table(sorted(glob.glob(f"{out}/candidates-*.parquet")), columns=["key"]).column("key").to_pylist()
    want = pq.read_table(sorted(glob.glob(f"{tmp_path}/clean/candidates-*.parquet")), columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(want)
    planted = {f"{t:05d}/{t:05d}{i:04d}": str(corpus / f"{t:05d}.tar") for t in range(3) for i in range(18)}
    # An image's proposals to the entities it did not go to are rejects of the proposal, not of the image.
    rejects = [r for r in read_rejects(out) if r["reason"] != "assigned_to_other_entity"]
    row = account("disk_full_rerun", "select_candidates", planted, keys, rejects)
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == 54


def test_trainer_checkpoints_on_a_full_disk(tmp_path, disk, demo_run, capfd):
    """The trainer's checkpoint fills the disk: one line, no checkpoint published; after
    space is freed the same command trains to the end."""
    from trainer import train

    if not disk.mounted:
        pytest.skip("the trainer writes its weights from native code (safetensors): needs a tmpfs this machine cannot mount")
    demo, _ = demo_run

    def args(out):
        return ["--train", str(demo / "rew" / "samples-*.parquet"), "--codes", str(demo / "codes"), "--output", str(out),
                "--model_config", "tiny", "--max_steps", "4", "--save_every", "2", "--batch_size", "8", "--resume", "auto"]

    out = os.path.join(disk.path, "model")
    # A tiny GIT's checkpoint with its optimizer state is several MiB.
    disk.fails_with_one_line("trainer.train", args(out), out, capfd)
    assert not glob.glob(os.path.join(out, "checkpoints", "step-*"))
    disk.grow()
    done = train.run(args(out))
    assert done["steps"] == 4 and json.load(open(os.path.join(out, "manifest.json")))["count_check"] == "ok"


def test_oven_to_shards_on_a_full_disk(tmp_path, disk, corpus, capfd):
    from pipelines import oven_to_shards
    from tests.conftest import write_jsonl

    images = tmp_path / "images"
    images.mkdir()
    for i in range(54):
        (images / f"oven_{i:05d}.jpg").write_bytes(_noise_jpeg(100 + i))
    oven = write_jsonl(tmp_path / "oven.jsonl", [{"data_id": f"d{i:05d}", "image_id": f"oven_{i:05d}", "question": "what is this?",
                                                  "entity_id": "Q243", "data_split": "entity_train"} for i in range(54)])

    def args(out):
        return ["--oven", oven, "--images", str(images), "--output", str(out), "--formats", "parquet", "--num_shards", "2"]

    out = os.path.join(disk.path, "oven")
    disk.fails_with_one_line("pipelines.oven_to_shards", args(out), out, capfd)
    disk.grow()
    assert oven_to_shards.run(args(out))["count_check"] == "ok"
    _no_leftovers(out)
    keys = pq.read_table(sorted(glob.glob(f"{out}/samples-*.parquet")), columns=["key"]).column("key").to_pylist()
    row = account("disk_full_rerun", "oven_to_shards", {f"d{i:05d}": oven for i in range(54)}, keys, read_rejects(out))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == 54


def test_build_entity_index_on_a_full_disk(tmp_path, capfd):
    """The entity index (embeddings, faiss index, table: ~1 MB for the demo catalog) on a
    256 KiB disk."""
    from pipelines import build_entity_index
    from pipelines.demo_data.make_corpus import bundled

    disk = SmallDisk(tmp_path / "tiny", size=256 << 10)
    try:
        out = os.path.join(disk.path, "index")
        args = ["--entities", bundled("entities.jsonl"), "--output", out]
        disk.fails_with_one_line("pipelines.build_entity_index", args, out, capfd)
        disk.grow()
        again = build_entity_index.run(args)
        clean = build_entity_index.run([args[0], args[1], "--output", str(tmp_path / "clean")])
        assert again["count_check"] == clean["count_check"] == "ok"
        _no_leftovers(out)
        got = pq.read_table(os.path.join(out, "entities.parquet")).to_pylist()
        assert got == pq.read_table(tmp_path / "clean" / "entities.parquet").to_pylist()
        account_counts("disk_full_rerun", "build_entity_index", 324, len(got),
                       [{"reason": "duplicate_qid"}] * again["counters"]["rejected_dedup_duplicate_qid"])
    finally:
        disk.close()


def test_refine_response_cache_on_a_full_disk(tmp_path, entity_index, catalog_path, capfd):
    """The LLM's answers are paid for: when the response cache cannot store them the run
    stops (exit 1, the line names `--cache`) rather than paying for answers it then loses;
    the re-run with space answers from what was stored and ends like a clean run."""
    import pyarrow as pa

    from pipelines import refine
    from tests.fake_llm_server import FakeLLMServer
    from tests.helpers import draw_image
    from transforms.schema import Sample, arrow_schema, to_row

    rows = [to_row(Sample(key=f"k{i:03d}", image=draw_image(i), image_format="jpg", width=64, height=48,
                          caption=f"Eiffel Tower photo {i} " + "words " * 40, qid="Q243", title="Eiffel Tower", source="t"))
            for i in range(40)]
    samples = str(tmp_path / "samples.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(Sample)), samples)
    disk = SmallDisk(tmp_path / "tiny", size=4096)
    try:
        cache = os.path.join(disk.path, "cache")

        def args(out, url, cache=cache):
            return ["--input", samples, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(out),
                    "--model", "fake-vlm", "--cache", cache, "--formats", "parquet", "--llm_backend", "openai",
                    "--endpoint", url]

        with FakeLLMServer() as server:
            out = tmp_path / "rew"
            disk.fails_with_one_line("pipelines.refine", args(out, server.url), cache, capfd, flag="--cache",
                                     manifest_in=str(out))
            paid = len(server.requests)
            disk.grow()
            again = refine.run(args(out, server.url))
            clean = refine.run(args(tmp_path / "clean", server.url, cache=str(tmp_path / "clean_cache")))
        assert paid > 0 and again["count_check"] == clean["count_check"] == "ok"
        _no_leftovers(str(out))
        keys = pq.read_table(sorted(glob.glob(f"{out}/samples-*.parquet")), columns=["key"]).column("key").to_pylist()
        want = pq.read_table(sorted(glob.glob(f"{tmp_path}/clean/samples-*.parquet")), columns=["key"]).column("key").to_pylist()
        assert sorted(keys) == sorted(want)
        row = account("disk_full_rerun", "refine[--cache]", {r["key"]: samples for r in rows}, keys, read_rejects(str(out)))
        assert row["lost"] == row["duplicated"] == 0 and row["out"] == 40
    finally:
        disk.close()


def test_build_codes_on_a_full_disk(tmp_path, demo_run, capfd):
    """The codes of the demo catalog (one Parquet file and a JSON manifest) on a disk of
    one page."""
    from pipelines import build_codes

    demo, _ = demo_run

    def args(out):
        return ["--entity_index", str(demo / "entity_index"), "--tokenizer", str(demo / "data" / "wordpiece" / "vocab.txt"),
                "--output", str(out)]

    disk = SmallDisk(tmp_path / "tiny", size=4096)
    try:
        out = os.path.join(disk.path, "codes")
        disk.fails_with_one_line("pipelines.build_codes", args(out), out, capfd)
        disk.grow()
        again = build_codes.run(args(out))
        clean = build_codes.run(args(tmp_path / "clean"))
        assert again["count_check"] == clean["count_check"] == "ok"
        _no_leftovers(out)
        got = pq.read_table(os.path.join(out, "codes.parquet")).to_pylist()
        want = pq.read_table(tmp_path / "clean" / "codes.parquet").to_pylist()
        assert got == want
        row = account_counts("disk_full_rerun", "build_codes", len(want), len(got), [])
        assert row["lost"] == row["duplicated"] == 0
    finally:
        disk.close()


def test_the_manifest_alone_on_a_full_disk(tmp_path, corpus, monkeypatch, capfd):
    """The data fitted; the disk fills as the manifest (written last) is written: the run
    is not claimed (no manifest, not even half of one), the line names the manifest, and
    the same command then ends like a clean run."""
    import builtins
    import errno

    from pipelines import oven_to_shards
    from tests.conftest import write_jsonl
    from transforms.run.cli import exit_code

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"oven_{i:05d}.jpg").write_bytes(_noise_jpeg(300 + i, side=32))
    oven = write_jsonl(tmp_path / "oven.jsonl", [{"data_id": f"d{i:05d}", "image_id": f"oven_{i:05d}", "question": "what is this?",
                                                  "entity_id": "Q243", "data_split": "entity_train"} for i in range(6)])
    out = str(tmp_path / "oven")
    args = ["--oven", oven, "--images", str(images), "--output", out, "--formats", "parquet", "--num_shards", "2"]
    real_open = builtins.open

    def full_at_the_manifest(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if "w" in mode and os.path.basename(os.fspath(file)).startswith("manifest.json"):
            class Full(io.FileIO):
                def write(self, data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.close()
            return Full(os.fspath(file), "wb")
        return f

    monkeypatch.setattr(builtins, "open", full_at_the_manifest)
    capfd.readouterr()
    assert exit_code(oven_to_shards.run, args) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: no space left on device writing {out}/manifest.json: free space or choose another --output, "
                    "then run the same command again")
    assert not [x for x in os.listdir(out) if x.startswith("manifest.json")]
    monkeypatch.undo()
    assert oven_to_shards.run(args)["count_check"] == "ok"
    _no_leftovers(out)
    keys = pq.read_table(sorted(glob.glob(f"{out}/samples-*.parquet")), columns=["key"]).column("key").to_pylist()
    row = account("disk_full_rerun", "manifest", {f"d{i:05d}": oven for i in range(6)}, keys, read_rejects(out))
    assert row["lost"] == row["duplicated"] == 0 and row["out"] == 6
