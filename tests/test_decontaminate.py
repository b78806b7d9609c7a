"""Decontamination: the CLIP path is open_clip's own, the threshold is exact, bad images are
rejected with their reason, and the pipeline's drops match a bare open_clip computation."""

import glob
import io
import json
import os

import apache_beam as beam
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipelines import decontaminate
from tests.conftest import direct_pipeline
from tests.helpers import read_rejects, write_parquet, write_webdataset
from transforms.errors import UsageError
from transforms.io.images import DecodedImage, decode_image
from transforms.io.readers import REJECTED
from transforms.models.clip import OpenClipImageHandler
from transforms.schema import Candidate, arrow_schema, to_row
from transforms.stages.decontaminate import DropNearDuplicates, EvalMatrix, EvalSearch

ARCH = "ViT-S-32"  # small random-weight CLIP: ~45 images/s on 2 CPU cores


def photo(seed: int, size=(96, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB").resize(size, Image.BICUBIC)
    return img


def jpeg(img, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight CLIP saved as a local checkpoint: loaded by path on both sides."""
    torch.manual_seed(123)
    model, _, _ = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "random_vit_s32.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def bare_embed(checkpoint, images):
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=checkpoint)
    model.eval()
    with torch.no_grad():
        f = model.encode_image(torch.stack([preprocess(im) for im in images]))
    return torch.nn.functional.normalize(f, dim=-1).numpy()


def test_handler_equals_open_clip(checkpoint):
    images = [photo(i) for i in range(5)]
    handler = OpenClipImageHandler(ARCH, checkpoint, batch_size=5)
    ours = np.stack([r.inference for r in handler.run_inference(images, handler.load_model())])
    ref = bare_embed(checkpoint, images)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_threshold_is_strictly_greater_in_float32():
    t = np.float32(0.95)
    below, above = np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1))

    def unit(c):
        c = np.float32(c)
        return np.array([c, np.sqrt(np.float32(1) - c * c)], np.float32)

    search = EvalSearch(EvalMatrix(["e0"], np.array([[1, 0]], np.float32)))
    cands = {name: Candidate(key=name, qid="Q1", image=b"x") for name in ("equal", "below", "above")}
    vecs = {"equal": unit(t), "below": unit(below), "above": unit(above)}
    names = ("equal", "below", "above")
    found = search.nearest(np.stack([vecs[n] for n in names]))
    # The test vectors' first coordinate is exactly the similarity with e0 = [1, 0].
    assert found[0] == ("e0", float(t))

    facts = DecodedImage(None, "JPEG", 1, 1, 1)
    elements = [((cands[n], facts), PredictionResult(vecs[n], f)) for n, f in zip(names, found)]
    with direct_pipeline() as p:
        out = (
            p
            | "Elements" >> beam.Create(elements)
            | beam.ParDo(DropNearDuplicates(0.95)).with_outputs(REJECTED, main="kept")
        )
        assert_that(out.kept | beam.Map(lambda s: s.key), equal_to(["equal", "below"]), label="kept")
        assert_that(
            out[REJECTED] | beam.Map(lambda r: (r.key, r.reason, json.loads(r.record_json)["eval_id"])),
            equal_to([("above", "near_duplicate_of_eval", "e0")]),
            label="dropped",
        )


def broken_png() -> bytes:
    data = bytearray(png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8))))
    data[data.find(b"IDAT") + 20] ^= 0xFF
    return bytes(data)


def write_candidates(path, rows):
    table = pa.Table.from_pylist([to_row(r) for r in rows], schema=arrow_schema(Candidate))
    pq.write_table(table, path)


@pytest.fixture
def corpus(tmp_path):
    """Candidates (select_candidates Parquet) with bad images, and an eval folder holding an
    exact copy, a re-encoded copy and a resized copy of three candidates plus unrelated
    images."""
    imgs = {i: photo(i) for i in range(8)}
    good = [
        Candidate(key=f"c{i}", url=f"http://c/{i}", caption=f"caption {i}", qid=f"Q{i}", title=f"T{i}",
                  score=0.5, rank=1, retrieval_rank=1, entity_id=i, source="s", image=jpeg(imgs[i]))
        for i in range(8)
    ]
    whole = jpeg(photo(50, (300, 300)))
    bad = [
        Candidate(key="corrupt", qid="Q9", title="T9", image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        Candidate(key="truncated", qid="Q9", title="T9", image=whole[: len(whole) // 2]),
        Candidate(key="bad_stream", qid="Q9", title="T9", image=broken_png()),
        Candidate(key="text", qid="Q9", title="T9", image=b"<html>not an image</html>"),
        Candidate(key="empty", qid="Q9", title="T9", image=None),
        Candidate(key="bomb", qid="Q9", title="T9", image=png(Image.new("1", (12000, 12000), 0))),
    ]
    write_candidates(tmp_path / "candidates.parquet", good + bad)
    ev = tmp_path / "eval"
    os.makedirs(ev / "00")
    (ev / "00" / "exact_c0.jpg").write_bytes(good[0].image)
    (ev / "reenc_c1.jpg").write_bytes(jpeg(imgs[1], quality=60))
    (ev / "resized_c2.png").write_bytes(png(imgs[2].resize((150, 150))))
    for j in range(3):
        (ev / f"unrelated{j}.jpg").write_bytes(jpeg(photo(1000 + j)))
    (ev / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return tmp_path, good, imgs


def test_pipeline_drops_exactly_what_open_clip_says(corpus, checkpoint):
    tmp_path, good, imgs = corpus
    out = tmp_path / "out"
    threshold = 0.99
    args = [
        "--input", str(tmp_path / "candidates.parquet"),
        "--eval_images", str(tmp_path / "eval"),
        "--output", str(out),
        "--clip_model", ARCH, "--clip_pretrained", checkpoint,
        "--threshold", str(threshold),
        "--formats", "parquet",
    ]
    # One evaluation image is broken: the run fails closed, naming it, and writes no shard.
    with pytest.raises(decontaminate.EvalCoverageError, match=r"1 of 7 evaluation images .*broken \(not_an_image\)"):
        decontaminate.run(args)
    assert not glob.glob(str(out / "samples-*"))
    summary = decontaminate.run([*args, "--allow_partial_eval"])
    # Oracle: bare open_clip on the decoded images, exact cosine, strict threshold.
    eval_files = sorted(p for p in glob.glob(str(tmp_path / "eval" / "**" / "*"), recursive=True)
                        if os.path.isfile(p) and "broken" not in p)
    eval_ids = [os.path.splitext(os.path.basename(p))[0] for p in eval_files]
    E = bare_embed(checkpoint, [decode_image(open(p, "rb").read()).image for p in eval_files])
    C = bare_embed(checkpoint, [decode_image(c.image).image for c in good])
    S = C @ E.T
    expected_drop = {good[i].key: eval_ids[int(S[i].argmax())] for i in range(len(good)) if S[i].max() > np.float32(threshold)}
    assert {"c0", "c2"} <= set(expected_drop)  # exact and resized copies are caught
    rejects = read_rejects(out)
    dropped = {r["key"]: json.loads(r["record_json"]) for r in rejects if r["reason"] == "near_duplicate_of_eval"}
    assert {k: v["eval_id"] for k, v in dropped.items()} == expected_drop
    for k, v in dropped.items():
        i = int(k[1:])
        assert abs(v["similarity"] - float(S[i].max())) < 1e-4
    kept = pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()
    assert {r["key"] for r in kept} == {c.key for c in good} - set(expected_drop)
    for r in kept:
        i = int(r["key"][1:])
        assert abs(r["max_eval_similarity"] - float(S[i].max())) < 1e-4
        assert r["nearest_eval_id"] == eval_ids[int(S[i].argmax())]
        assert r["image"] == good[i].image and (r["width"], r["height"]) == (96, 96) and r["image_format"] == "jpg"
    reasons = {r["key"]: r["reason"] for r in rejects if r["stage"] == "decode"}
    assert reasons == {
        "corrupt": "not_an_image",  # PNG magic, broken header: Pillow cannot identify it
        "truncated": "truncated_image",
        "bad_stream": "corrupt_image",
        "text": "not_an_image",
        "empty": "empty_image",
        "bomb": "too_many_pixels",
    }
    assert [(r["key"], r["reason"]) for r in read_rejects(out / "eval_set")] == [("broken", "not_an_image")]
    assert summary["count_check"] == "ok", summary["count_check"]
    assert summary["eval_images"] == {"listed": 7, "embedded": 6, "coverage": "partial (--allow_partial_eval)"}
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["threshold"] == threshold and manifest["clip"]["model"] == ARCH
    eval_manifest = json.load(open(out / "eval_set" / "manifest.json"))
    assert eval_manifest["count_check"] == "ok" and eval_manifest["counters"]["eval_images_embedded"] == 6
    # The eval set is reusable: the same shards from its embeddings, without --eval_images.
    model_args = ["--clip_model", ARCH, "--clip_pretrained", checkpoint, "--threshold", str(threshold), "--formats", "parquet"]
    again = decontaminate.run(
        ["--input", str(tmp_path / "candidates.parquet"), "--eval_embeddings", str(out / "eval_set"),
         "--output", str(tmp_path / "again"), *model_args, "--allow_partial_eval"]
    )
    assert again["counters"]["decontaminate_dropped"] == summary["counters"]["decontaminate_dropped"]
    assert sorted(r["key"] for r in pq.read_table(glob.glob(str(tmp_path / "again" / "samples-*.parquet"))).to_pylist()) == sorted(
        r["key"] for r in kept
    )
    with pytest.raises(UsageError, match="cannot be compared"):
        decontaminate.run(["--input", str(tmp_path / "candidates.parquet"), "--eval_embeddings", str(out / "eval_set"),
                           "--output", str(tmp_path / "x"), "--clip_model", ARCH, "--clip_pretrained", "none"])


def test_draft_decode_on_both_sides_matches_the_oracle(tmp_path, checkpoint):
    """--decode_draft yes (the default): large JPEGs decode at a reduced DCT scale on the
    evaluation and candidate sides alike; similarities equal open_clip on draft-decoded
    pixels, a resized copy of an evaluation image is still caught, the shards keep the
    stored size, and an eval set made the other way cannot be reused silently."""
    big = photo(7, (1200, 800))
    other = photo(8, (1000, 700))
    os.makedirs(tmp_path / "eval")
    (tmp_path / "eval" / "e0.jpg").write_bytes(jpeg(big.resize((900, 600), Image.BICUBIC), quality=85))
    (tmp_path / "eval" / "e1.jpg").write_bytes(jpeg(photo(9, (700, 500))))
    cands = [Candidate(key="c0", url="http://c0", caption="c", qid="Q1", title="T", image=jpeg(big)),
             Candidate(key="c1", url="http://c1", caption="c", qid="Q1", title="T", image=jpeg(other))]
    pq.write_table(pa.Table.from_pylist([to_row(c) for c in cands], schema=arrow_schema(Candidate)), tmp_path / "c.parquet")
    args = ["--input", str(tmp_path / "c.parquet"), "--clip_model", ARCH, "--clip_pretrained", checkpoint,
            "--threshold", "0.99", "--formats", "parquet"]
    summary = decontaminate.run([*args, "--eval_images", str(tmp_path / "eval"), "--output", str(tmp_path / "out")])
    assert summary["decode"] == {"draft": True, "draft_side": 224}
    drafted = [decode_image(c.image, draft=(224, 224)).image for c in cands]
    assert [im.size for im in drafted] == [(600, 400), (500, 350)]  # the draft did apply (1/2)
    E = bare_embed(checkpoint, [decode_image(open(tmp_path / "eval" / f, "rb").read(), draft=(224, 224)).image
                                for f in ("e0.jpg", "e1.jpg")])
    S = bare_embed(checkpoint, drafted) @ E.T
    assert S[0, 0] > 0.99  # the resized copy is caught
    rejects = {r["key"]: json.loads(r["record_json"]) for r in read_rejects(tmp_path / "out")}
    assert set(rejects) == {k for k, i in (("c0", 0), ("c1", 1)) if S[i].max() > np.float32(0.99)}
    assert abs(rejects["c0"]["similarity"] - float(S[0].max())) < 1e-4
    kept = pq.read_table(glob.glob(str(tmp_path / "out" / "samples-*.parquet"))).to_pylist()
    assert [r["key"] for r in kept] == ["c1"]
    for r in kept:
        i = int(r["key"][1:])
        assert abs(r["max_eval_similarity"] - float(S[i].max())) < 1e-4
        assert (r["width"], r["height"]) == ((1200, 800), (1000, 700))[i]
    with pytest.raises(UsageError, match="--decode_draft yes"):
        decontaminate.run([*args, "--eval_embeddings", str(tmp_path / "out" / "eval_set"), "--output",
                           str(tmp_path / "again"), "--decode_draft", "no"])


def test_webdataset_input_and_oven_annotations(tmp_path, checkpoint):
    """img2dataset shards downloaded from select_candidates' caption-only output, and OVEN
    annotation lines with images in two-digit sub-folders."""
    a, b = photo(1), photo(2)
    write_webdataset(
        tmp_path / "00000.tar",
        [
            {"key": "000000000", "jpg": jpeg(a), "txt": "caption a", "json": {"key": "000000000", "url": "http://a", "caption": "caption a", "qid": "Q243", "title": "Eiffel Tower", "score": 0.7, "rank": 1, "entity_id": 0, "status": "success"}},
            {"key": "000000001", "jpg": jpeg(b), "txt": "caption b", "json": {"key": "000000001", "url": "http://b", "caption": "caption b", "qid": "Q9202", "title": "Statue of Liberty", "score": 0.6, "rank": 1, "entity_id": 1, "status": "success"}},
            {"key": "000000002", "jpg": jpeg(b), "txt": "no entity", "json": {"key": "000000002", "url": "http://c"}},
        ],
    )
    root = tmp_path / "oven_images"
    os.makedirs(root / "04")
    (root / "04" / "oven_04000001.jpg").write_bytes(jpeg(a))
    ann = tmp_path / "oven_val.jsonl"
    ann.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"data_id": "d1", "image_id": "oven_04000001", "question": "what is this?", "entity_id": "Q243", "data_split": "entity_val_seen"},
                {"data_id": "d2", "image_id": "oven_04000001", "question": "which tower?", "entity_id": "Q243", "data_split": "query_val_seen"},
                {"data_id": "d3", "image_id": "oven_09999999", "question": "?", "entity_id": "Q1", "data_split": "entity_val_unseen"},
            ]
        )
    )
    out = tmp_path / "out"
    summary = decontaminate.run(
        ["--input", str(tmp_path / "*.tar"), "--eval_images", str(ann), "--eval_image_root", str(root),
         "--output", str(out), "--clip_model", ARCH, "--clip_pretrained", "none", "--formats", "parquet",
         # Random weights: only (near-)exact copies are reliably above the rest.
         "--threshold", "0.9999", "--allow_partial_eval"]
    )
    rejects = read_rejects(out) + read_rejects(out / "eval_set")
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r["key"])
    # img2dataset's keys are qualified by their shard (the corpus identity rule).
    assert by_reason["near_duplicate_of_eval"] == ["00000/000000000"]
    assert by_reason["missing_entity"] == ["00000/000000002"]
    assert by_reason["eval_image_missing"] == ["oven_09999999"]
    kept = pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()
    assert [(r["key"], r["qid"], r["title"]) for r in kept] == [("00000/000000001", "Q9202", "Statue of Liberty")]
    assert summary["count_check"] == "ok"


@pytest.mark.slow
def test_a_whole_img2dataset_folder_failures_are_rejects_with_their_status(tmp_path, checkpoint):
    """decontaminate given img2dataset's whole webdataset folder: the tars are the samples;
    the Parquet beside each tar (every URL tried, with `status`) gives its failed downloads
    as rejects, with img2dataset's status and message, and nothing twice."""
    meta = {"qid": "Q243", "title": "Eiffel Tower", "score": 0.7, "rank": 1, "entity_id": 0}
    folder = tmp_path / "images"
    folder.mkdir()
    write_webdataset(folder / "00000.tar", [
        {"key": f"00000000{i}", "jpg": jpeg(photo(10 + i)), "txt": f"caption {i}",
         "json": {"key": f"00000000{i}", "url": f"http://x/{i}.jpg", "caption": f"caption {i}", "status": "success", **meta}}
        for i in range(3)
    ])
    rows = [{"key": f"00000000{i}", "url": f"http://x/{i}.jpg", "caption": f"caption {i}", "status": "success",
             "error_message": None, **meta} for i in range(3)]
    rows += [{"key": f"00000000{i}", "url": f"http://x/{i}.jpg", "caption": f"caption {i}", "status": "failed_to_download",
              "error_message": "HTTP Error 404: Not Found", **meta} for i in range(3, 5)]
    write_parquet(folder / "00000.parquet", rows)
    (folder / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 3, "failed_to_download": 2}))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "copy.jpg").write_bytes(jpeg(photo(10)))  # sample 0, exactly
    out = tmp_path / "out"
    summary = decontaminate.run(
        ["--input", str(folder), "--eval_images", str(evals), "--output", str(out),
         "--clip_model", ARCH, "--clip_pretrained", "none", "--formats", "parquet", "--threshold", "0.9999"]
    )
    rejects = read_rejects(out)
    failed = sorted((r["key"], r["reason"], r["detail"]) for r in rejects if r["stage"] == "read_candidates")
    assert failed == [(f"00000/00000000{i}", "download_failed", "status='failed_to_download' HTTP Error 404: Not Found")
                      for i in (3, 4)]
    kept = pq.read_table(glob.glob(str(out / "samples-*.parquet"))).to_pylist()
    dropped = [r for r in rejects if r["reason"] == "near_duplicate_of_eval"]
    assert (len(kept), len(dropped)) == (2, 1) and not any(r["reason"] == "missing_entity" for r in rejects)
    assert summary["counters"]["img2dataset_rows_in_tars"] == 3
    assert summary["count_check"] == "ok"


def test_misuse(tmp_path):
    with pytest.raises(UsageError, match="--clip_model 'ViT-L/14'"):
        decontaminate.run(["--input", "x", "--eval_images", "y", "--output", "o", "--clip_model", "ViT-L/14"])
    with pytest.raises(UsageError, match="--clip_pretrained .*no such checkpoint"):
        decontaminate.run(["--input", "x", "--eval_images", "y", "--output", "o", "--clip_model", ARCH,
                           "--clip_pretrained", str(tmp_path / "missing.pt")])
    with pytest.raises(UsageError, match="--formats"):
        decontaminate.run(["--input", "x", "--eval_images", "y", "--output", "o", "--formats", "parquet,csv"])
    with pytest.raises(UsageError, match="--eval_image_root"):
        (tmp_path / "a.jsonl").write_text("{}\n")
        (tmp_path / "c.parquet").write_bytes(b"")
        decontaminate.run(["--input", str(tmp_path / "c.parquet"), "--eval_images", str(tmp_path / "a.jsonl"),
                           "--output", "o", "--clip_model", ARCH, "--clip_pretrained", "none"])


def test_clip_shared_per_machine_embeds_like_the_local_model(checkpoint):
    """--share_clip: the model sits behind Beam's cross-process proxy, which forwards method
    calls only; the vectors must equal the in-process model's."""
    from apache_beam.ml.inference.base import RunInference

    images = [photo(i) for i in range(4)]
    local = OpenClipImageHandler(ARCH, checkpoint, batch_size=4)
    expected = np.stack([r.inference for r in local.run_inference(images, local.load_model())])
    shared = OpenClipImageHandler(ARCH, checkpoint, batch_size=4, share_across_processes=True)
    assert shared.share_model_across_processes()
    with direct_pipeline() as p:
        got = p | beam.Create(images) | RunInference(shared) | beam.Map(lambda r: r.inference.tolist())
        assert_that(
            got | beam.combiners.ToList(),
            lambda out: np.testing.assert_allclose(np.array(sorted(out[0])), np.array(sorted(expected.tolist())), atol=1e-5),
        )
