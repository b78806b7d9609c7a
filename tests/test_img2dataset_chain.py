"""A chain through a real img2dataset download: select_candidates on a caption-only corpus
(LAION-style Parquet, URLs on a loopback server, some of them dead), img2dataset 1.47 run
by the recipe as a `run:` stage, decontaminate given img2dataset's whole output folder.
Every selected URL is accounted for: downloaded (then kept or rejected by decontaminate)
or rejected with img2dataset's own reason, and the chain's summary says selected =
downloaded + failed.

img2dataset pins versions that conflict with ours, so it lives in an environment of its
own (`.venv-img2dataset`, git-ignored; `IMG2DATASET=/path/to/img2dataset` uses another),
made here from the package index when missing; the test is skipped only when that
environment cannot be installed on this machine."""

import glob
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import read_rejects

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "1.47.0"


@pytest.fixture(scope="module")
def img2dataset():
    exe = os.environ.get("IMG2DATASET") or os.path.join(ROOT, ".venv-img2dataset", "bin", "img2dataset")
    if _works(exe):
        return exe
    if os.environ.get("IMG2DATASET"):
        pytest.fail(f"IMG2DATASET={exe} does not run")
    venv = os.path.dirname(os.path.dirname(exe))
    subprocess.run(["python3", "-m", "venv", "--clear", venv], check=True)
    proc = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                           f"img2dataset=={VERSION}"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"img2dataset {VERSION} cannot be installed here: {proc.stderr.strip()[-300:]}")
    assert _works(exe), f"{exe} was installed but does not run"
    return exe


def _works(exe: str) -> bool:
    if not os.path.exists(exe):
        return False
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, env=dict(os.environ, PAGER="cat"))
    return proc.returncode == 0


def _dead(key: str) -> bool:
    """About one URL in eight answers 404."""
    return hashlib.sha256(key.encode()).digest()[0] % 8 == 0


class _Images(http.server.BaseHTTPRequestHandler):
    images: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        key = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        body = self.images.get(key)
        if body is None or _dead(key):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory, server):
    """The demo corpus as captions only: its LAION Parquet with URLs on the loopback server,
    which serves the images of its webdataset copy; an evaluation set with exact copies of
    three of them."""
    import open_clip
    import torch

    from pipelines.demo_data.make_corpus import write_corpus

    folder = tmp_path_factory.mktemp("i2d_data")
    write_corpus(str(folder))
    for path in glob.glob(str(folder / "webdataset" / "*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    _Images.images[m.name[:-4]] = tar.extractfile(m).read()
    for path in glob.glob(str(folder / "laion" / "*.parquet")):
        t = pq.read_table(path)
        urls = [u.replace("https://demo.invalid", server) for u in t.column("URL").to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("URL"), "URL", pa.array(urls)), path)
    evals = folder / "eval"
    evals.mkdir()
    alive = sorted(k for k in _Images.images if not _dead(k))
    for key in alive[:3]:
        (evals / f"{key}.jpg").write_bytes(_Images.images[key])
    torch.manual_seed(123)
    model, _, _ = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    torch.save(model.state_dict(), folder / "clip.pt")
    return folder


RECIPE = """\
version: 1
name: img2dataset-chain
data: {data}
stages:
  - name: entity_index
    command: build_entity_index
    flags:
      entities: ${{data}}/entities.jsonl
  - name: candidates
    command: select_candidates
    flags:
      captions: ${{data}}/laion
      caption_format: laion_parquet
      k: 3
  - name: images
    run: [{exe}, --url_list, "${{output}}/candidates", --input_format, parquet,
          --url_col, url, --caption_col, caption,
          --save_additional_columns, '["qid","title","score","rank","entity_id"]',
          --output_format, webdataset, --output_folder, "${{stage}}", --resize_mode, "no",
          --processes_count, "1", --thread_count, "8", --timeout, "5", --retries, "0",
          --enable_wandb, "False", --distributor, multiprocessing]
    outputs: ["${{stage}}/*.tar"]
    after: [candidates]
  - name: shards
    command: decontaminate
    flags:
      input: ${{output}}/images
      eval_images: ${{data}}/eval
      clip_model: ViT-S-32
      clip_pretrained: ${{data}}/clip.pt
      threshold: 0.9999
      formats: parquet
    after: [images]
"""


def test_every_selected_url_is_downloaded_or_rejected_with_img2dataset_reason(tmp_path, data, img2dataset):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data, exe=img2dataset))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_GCE_CHECK="true", PYTHONPATH=ROOT, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", str(recipe), "--output", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    selected = pq.read_table(sorted(glob.glob(str(out / "candidates" / "candidates-*.parquet"))),
                             columns=["url"]).column("url").to_pylist()
    dead = {u for u in selected if _dead(u.rsplit("/", 1)[-1].removesuffix(".jpg"))}
    assert len(selected) >= 100 and 5 <= len(dead) < len(selected) // 3, (len(selected), len(dead))

    # The chain's summary: selected = downloaded + failed, failures by img2dataset's reason.
    chain = json.loads((out / "chain.json").read_text())
    images = next(s for s in chain["stages"] if s["name"] == "images")
    dl = images["download"]
    assert (dl["tried"], dl["downloaded"], sum(dl["failed"].values())) == (len(selected), len(selected) - len(dead), len(dead))
    assert all("404" in reason for reason in dl["failed"]), dl["failed"]
    assert images["count_check"] == (f"ok: {len(selected):,} selected = {len(selected) - len(dead):,} downloaded + "
                                     f"{len(dead):,} failed")
    readme = (out / "README.md").read_text()
    assert f"downloaded {len(selected) - len(dead):,} of {len(selected):,} URLs" in readme

    # decontaminate on the whole folder: the dead URLs are its download_failed rejects with
    # img2dataset's message; every other selected URL is a kept sample or another reject.
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["count_check"] == "ok"
    rejects = read_rejects(out / "shards")
    failed = [r for r in rejects if r["reason"] == "download_failed"]
    assert len(failed) == len(dead) and all("404" in r["detail"] for r in failed)
    kept = pq.read_table(sorted(glob.glob(str(out / "shards" / "samples-*.parquet"))), columns=["url"]).column("url").to_pylist()
    others = [r for r in rejects if r["stage"] != "eval_set" and r["reason"] != "download_failed"]
    assert not any(r["reason"] == "missing_entity" for r in rejects)
    assert len(kept) + len(others) == len(selected) - len(dead)
    assert set(kept).isdisjoint(dead) and len(set(kept)) == len(kept)
    near = [r for r in others if r["reason"] == "near_duplicate_of_eval"]
    copies = {p.stem for p in (data / "eval").glob("*.jpg")} & {u.rsplit("/", 1)[-1].removesuffix(".jpg") for u in selected}
    assert len(near) == len(copies)
