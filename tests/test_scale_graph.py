"""Web-scale properties of the selection graph: image bytes never cross a shuffle, keys of
different corpus runs do not collide, and one key with two different images is a reject."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines import select_candidates
from tests.helpers import draw_image, read_candidates, read_rejects, write_webdataset
from transforms.formats.keys import image_identity, input_root, source_tag
from transforms.formats.webdataset import TarMemberRef, iter_webdataset, read_tar_member

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow


def noise_jpeg(seed: int, side: int = 256) -> bytes:
    """An incompressible image (~40-60 KB): shuffle bytes must not depend on it."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


MATCHING = ["Eiffel Tower at night", "Mona Lisa in the Louvre", "Golden Gate Bridge in fog"]


def test_identity_rules():
    assert input_root("/data/run1/*.tar,/data/run2/*.tar") == "/data/"
    assert input_root("/data/run1/") == "/data/run1/"
    assert input_root("gs://b/c/*/*.tar") == "gs://b/c/"
    assert source_tag("/data/run1/00000.tar", "/data/") == "run1/00000"
    assert source_tag("gs://b/c/x/00001.parquet", "gs://b/c/") == "x/00001"
    # One rule: a corpus key is qualified by its file; an empty key is no key; without a
    # key the URL hash names the image.
    assert image_identity("000000001", "http://u", "run1/00000") == "run1/00000/000000001"
    assert image_identity("", "http://u", "t") == image_identity(None, "http://u", "t") != image_identity(None, "http://v", "t")
    assert image_identity(None, "http://u", "t", qualify_url=False) == image_identity(None, "http://u", None)
    assert image_identity("", "", "t") is None
    # Folders with nothing in common still give distinct tags, never bare basenames.
    assert input_root("run1/*.tar,run2/*.tar") == "" and source_tag("run1/00000.tar", "") == "run1/00000"
    assert input_root("/d1/run/*.tar,/d2/run/*.tar") == "/"
    assert source_tag("/d1/run/00000.tar", "/") != source_tag("/d2/run/00000.tar", "/")


def test_caption_pass_reads_no_image_bytes(tmp_path):
    samples = [{"key": f"{i:04d}", "jpg": noise_jpeg(i), "txt": f"caption {i}"} for i in range(8)]
    path = write_webdataset(tmp_path / "a.tar", samples)
    image_bytes = sum(len(s["jpg"]) for s in samples)

    class Counting(io.FileIO):
        read_total = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_total += len(data)
            return data

        def readinto(self, b):
            n = super().readinto(b)
            Counting.read_total += n or 0
            return n

    with io.BufferedReader(Counting(path), buffer_size=4096) as f:
        got = list(iter_webdataset(f, path=path, read_ext=lambda ext: ext != "jpg"))
    assert [k for k, _ in got] == [s["key"] for s in samples]
    assert all(isinstance(parts["jpg"], TarMemberRef) and parts["txt"].startswith(b"caption") for _, parts in got)
    # Headers and captions only: far less than the images it skipped.
    assert Counting.read_total < image_bytes / 10, (Counting.read_total, image_bytes)
    # The refs read the images back exactly, and a changed tar is caught, not misread.
    with open(path, "rb") as f:
        for (_, parts), s in zip(got, samples):
            assert read_tar_member(f, parts["jpg"]) == s["jpg"]
        bad = TarMemberRef(got[1][1]["jpg"].data_offset, got[1][1]["jpg"].size + 1)
        try:
            read_tar_member(f, bad)
            raise AssertionError("a wrong size must not read")
        except tarfile.ReadError as e:
            assert "the tar changed" in str(e)


def _corpus(root, side: int, n_unrelated: int = 24):
    samples = [{"key": f"{i:09d}", "jpg": noise_jpeg(i, side), "txt": t} for i, t in enumerate(MATCHING)]
    samples += [
        {"key": f"{100 + i:09d}", "jpg": noise_jpeg(100 + i, side), "txt": f"random stock photo number {i} of a kitchen sink"}
        for i in range(n_unrelated)
    ]
    os.makedirs(root, exist_ok=True)
    write_webdataset(root / "00000.tar", samples[:14])
    write_webdataset(root / "00001.tar", samples[14:])
    return samples


def _select(entity_index, captions, out, *extra):
    return select_candidates.run(
        ["--entity_index", entity_index, "--captions", str(captions), "--caption_format", "webdataset",
         "--min_score", "0.6", "--k", "3", "--output", str(out), *extra]
    )


def test_shuffle_bytes_follow_the_kept_images_not_the_corpus(tmp_path, entity_index):
    _corpus(tmp_path / "small", 32)
    small = _select(entity_index, tmp_path / "small", tmp_path / "out_small")
    big_samples = _corpus(tmp_path / "big", 320)
    big = _select(entity_index, tmp_path / "big", tmp_path / "out_big")
    corpus_bytes = sum(len(s["jpg"]) for s in big_samples)
    assert corpus_bytes > 2_000_000
    for summary in (small, big):
        assert summary["count_check"] == "ok", summary["count_check"]
        shuffles = summary["shuffles"]
        assert set(shuffles) >= {"top_k_per_entity", "one_entity_per_image", "join_entity_table", "attach_images"}
        # The image join moves one small record per kept image, and only those.
        assert shuffles["attach_images"]["elements"] == summary["counters"]["images_kept"] == len(MATCHING)
    total_big = sum(v["bytes"] for v in big["shuffles"].values())
    assert total_big < corpus_bytes / 100, (total_big, corpus_bytes)
    # 100x larger images, the same shuffles (up to the digits of the image offsets): no
    # image byte crosses a shuffle.
    for step, v in big["shuffles"].items():
        assert v["elements"] == small["shuffles"][step]["elements"]
        assert v["bytes"] <= 1.1 * small["shuffles"][step]["bytes"], step
    rows = read_candidates(tmp_path / "out_big")
    by_caption = {s["txt"]: s["jpg"] for s in big_samples}
    assert sorted(r["caption"] for r in rows) == sorted(MATCHING)
    assert all(r["image"] == by_caption[r["caption"]] for r in rows)
    manifest = json.load(open(tmp_path / "out_big" / "manifest.json"))
    assert manifest["shuffles"] == big["shuffles"]


def test_two_runs_with_the_same_keys_do_not_collide(tmp_path, entity_index):
    """Two img2dataset runs both number from 000000000: each image keeps its own caption."""
    a = [{"key": "000000000", "jpg": draw_image(1), "txt": "Eiffel Tower at night"}]
    b = [{"key": "000000000", "jpg": draw_image(2), "txt": "Mona Lisa in the Louvre"}]
    os.makedirs(tmp_path / "corpus" / "run1")
    os.makedirs(tmp_path / "corpus" / "run2")
    write_webdataset(tmp_path / "corpus" / "run1" / "00000.tar", a)
    write_webdataset(tmp_path / "corpus" / "run2" / "00000.tar", b)
    summary = _select(entity_index, tmp_path / "corpus" / "*" / "*.tar", tmp_path / "out")
    rows = {r["key"]: r for r in read_candidates(tmp_path / "out")}
    assert set(rows) == {"run1/00000/000000000", "run2/00000/000000000"}
    assert rows["run1/00000/000000000"]["title"] == "Eiffel Tower"
    assert rows["run1/00000/000000000"]["image"] == a[0]["jpg"]
    assert rows["run2/00000/000000000"]["title"] == "Mona Lisa"
    assert rows["run2/00000/000000000"]["image"] == b[0]["jpg"]
    assert summary["count_check"] == "ok"


def test_one_key_two_different_images_is_a_reject(tmp_path, entity_index):
    samples = [
        {"key": "k", "jpg": draw_image(1), "txt": "Eiffel Tower at night"},
        {"key": "other", "jpg": draw_image(3), "txt": "Golden Gate Bridge in fog"},
        {"key": "k", "jpg": draw_image(2), "txt": "the Eiffel Tower from the Seine"},
    ]
    os.makedirs(tmp_path / "c")
    write_webdataset(tmp_path / "c" / "00000.tar", samples)
    summary = _select(entity_index, tmp_path / "c", tmp_path / "out")
    rows = read_candidates(tmp_path / "out")
    assert [r["key"] for r in rows] == ["00000/other"]
    collisions = [r for r in read_rejects(tmp_path / "out") if r["reason"] == "key_collision"]
    assert [r["key"] for r in collisions] == ["00000/k"] and "2 different images" in collisions[0]["detail"]
    assert summary["counters"]["rejected_select_key_collision"] == 1
    assert summary["count_check"] == "ok", summary["count_check"]


def test_thread_budget_is_decided_on_the_worker(monkeypatch):
    """The launcher records the runner's layout; the cores are counted where the code runs."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.run import job as common

    budget = common.threads_per_process(PipelineOptions(["--runner", "DataflowRunner"]))
    assert budget == common.ThreadBudget(explicit=0, processes=0)
    monkeypatch.setattr(common, "machine_cores", lambda: 32)
    assert common.resolve_threads(budget) == 1  # Dataflow: one SDK process per core
    single = common.threads_per_process(
        PipelineOptions(["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"])
    )
    assert common.resolve_threads(single) == 32
    multi = common.threads_per_process(
        PipelineOptions(["--direct_running_mode", "multi_processing", "--direct_num_workers", "4"])
    )
    assert common.resolve_threads(multi) == 8
    monkeypatch.setattr(common, "machine_cores", lambda: 2)
    assert common.resolve_threads(multi) == 1
    assert common.resolve_threads(common.threads_per_process(PipelineOptions([]), explicit=3)) == 3


def test_ivf_nprobe_is_calibrated_from_a_recall_curve():
    import faiss

    from transforms.stages.build_entity_index import (
        build_faiss_index,
        calibrate_search,
        exact_top_k,
        train_sample_size,
    )

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, 6000)] + 0.4 * rng.standard_normal((6000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Exact top-k by streaming chunks equals one big product.
    q = vectors[:50]
    full = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :10]
    assert (np.sort(exact_top_k(vectors, q, 10, chunk=700), axis=1) == np.sort(full, axis=1)).all()

    index = build_faiss_index(vectors, "IVF64,Flat", 0, seed=0)
    search = calibrate_search(index, vectors, k=10, n_queries=300, target_recall=0.9)
    curve = search["recall_curve"]
    recalls = [c["recall_at_10"] for c in curve]
    assert [c["nprobe"] for c in curve][0] == 1 and curve[-1]["nprobe"] == 64
    assert recalls[-1] == 1.0 and recalls[0] < 0.9  # nprobe = 1 loses recall on these data
    assert all(b >= a - 1e-9 for a, b in zip(recalls, recalls[1:]))
    chosen = search["params"]["nprobe"]
    first_ok = next(c["nprobe"] for c in curve if c["recall_at_10"] >= 0.9)
    assert chosen == first_ok and faiss.extract_index_ivf(index).nprobe == chosen
    # The training sample follows faiss's advice, or says why not.
    assert train_sample_size(index, 10_000_000, 0) == (1_000_000, None)  # PQ/IVF floor
    big = faiss.index_factory(32, "IVF65536,Flat", faiss.METRIC_INNER_PRODUCT)
    assert train_sample_size(big, 10_000_000, 0) == (50 * 65536, None)
    take, warning = train_sample_size(index, 10_000_000, 1000)
    assert take == 1000 and "39 x nlist" in warning and "--train_sample" in warning
    take, warning = train_sample_size(index, 2000, 0)
    assert take == 2000 and "fewer lists" in warning
    flat = build_faiss_index(vectors, "Flat", 0, seed=0)
    assert calibrate_search(flat, vectors) is None


def test_index_manifest_search_params_reach_the_searchers(tmp_path, catalog_path):
    import faiss

    from pipelines import build_entity_index
    from transforms.models.faiss_index import FaissSearchHandler
    from transforms.stages.ground import load_grounder

    out = tmp_path / "ivf"
    manifest = build_entity_index.run(["--entities", catalog_path, "--output", str(out), "--index_factory", "IVF4,Flat"])
    nprobe = manifest["search"]["params"]["nprobe"]
    assert manifest["search"]["recall_curve"][-1]["nprobe"] == 4 and 1 <= nprobe <= 4
    handler = FaissSearchHandler(str(out / "entities.faiss"), 3, search_params=manifest["search"]["params"])
    assert faiss.extract_index_ivf(handler.load_model().index).nprobe == nprobe
    override = FaissSearchHandler(str(out / "entities.faiss"), 3, nprobe=3, search_params=manifest["search"]["params"])
    assert faiss.extract_index_ivf(override.load_model().index).nprobe == 3
    assert faiss.extract_index_ivf(load_grounder(str(out)).index).nprobe == nprobe


def test_gzipped_tars_are_read_and_their_images_found(tmp_path, entity_index):
    import gzip

    samples = [{"key": "k1", "jpg": noise_jpeg(1, 64), "txt": "Eiffel Tower at night"},
               {"key": "k2", "jpg": noise_jpeg(2, 64), "txt": "Mona Lisa in the Louvre"}]
    plain = write_webdataset(tmp_path / "plain.tmp", samples)
    os.makedirs(tmp_path / "c")
    with open(plain, "rb") as src, gzip.open(tmp_path / "c" / "00000.tar.gz", "wb") as dst:
        dst.write(src.read())
    summary = _select(entity_index, tmp_path / "c", tmp_path / "out")
    rows = {r["caption"]: r for r in read_candidates(tmp_path / "out")}
    assert summary["count_check"] == "ok" and set(rows) == {s["txt"] for s in samples}
    assert all(rows[s["txt"]]["image"] == s["jpg"] for s in samples)


def test_dry_run_without_dataflow_is_refused(tmp_path, entity_index):
    from transforms.errors import UsageError

    write_webdataset(tmp_path / "a.tar", [{"key": "k", "jpg": draw_image(1), "txt": "Eiffel Tower"}])
    try:
        select_candidates.run(["--entity_index", entity_index, "--captions", str(tmp_path / "a.tar"), "--caption_format",
                               "webdataset", "--output", str(tmp_path / "out"), "--dry_run=True"])
        raise AssertionError("a DirectRunner dry run must not run")
    except UsageError as e:
        assert "--runner DataflowRunner" in str(e)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_large_images_are_downscaled_for_the_llm_whatever_their_shape():
    from transforms.io.images import image_for_llm, probe_size

    for size in ((2048, 2048), (4096, 1024), (800, 600)):
        data = noise_jpeg(3, 8)  # replaced below by an image of `size`
        buf = io.BytesIO()
        Image.new("RGB", size, (120, 30, 200)).save(buf, format="JPEG")
        data = buf.getvalue()
        sent, mime = image_for_llm(data, 1024)
        w, h, _ = probe_size(sent)
        assert mime == "image/jpeg" and max(w, h) == min(1024, max(size))
        assert (sent == data) == (max(size) <= 1024)
