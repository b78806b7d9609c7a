"""Pipeline smoke tests on the real text model: run the commands, read the outputs back."""

import json
import subprocess
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import select_candidates
from tests.helpers import draw_image, read_candidates, read_rejects, write_parquet, write_webdataset
from transforms.errors import UsageError


def test_entity_index_files_agree(entity_index):
    manifest = json.load(open(f"{entity_index}/manifest.json"))
    assert manifest["model"] == "all-MiniLM-L6-v2" and manifest["dimension"] == 384
    assert manifest["count_check"] == "ok"
    table = pq.read_table(f"{entity_index}/entities.parquet").to_pylist()
    emb = np.load(f"{entity_index}/embeddings.npy")
    index = faiss.read_index(f"{entity_index}/entities.faiss")
    assert [r["int_id"] for r in table] == list(range(16)) == list(range(index.ntotal))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Row i of the index is entity i: searching its own vector finds itself, except that the
    # uncased encoder gives "Ball" and "BALL" one vector, so either may come first.
    _, ids = index.search(emb, 1)
    ball = {titles_index: i for i, titles_index in enumerate(r["title"] for r in table)}
    ties = {ball["Ball"], ball["BALL"]}
    assert all(i == j or {i, j} == ties for i, j in enumerate(ids[:, 0].tolist()))
    np.testing.assert_array_equal(emb[ball["Ball"]], emb[ball["BALL"]])
    # Case-only duplicates are two entities; the duplicate QID was collapsed.
    titles = [r["title"] for r in table]
    assert "Ball" in titles and "BALL" in titles and titles.count("Eiffel Tower") == 1


EXACT_TITLE_CASES = {
    "Tourists photographing the Eiffel Tower on a summer afternoon": "Q243",
    "Statue of Liberty seen from the ferry, New York": "Q9202",
    "Golden Gate Bridge at sunset with fog rolling in": "Q44440",
    "The Taj Mahal reflected in the pool, Agra India": "Q9141",
    "Mona Lisa behind glass at the Louvre museum": "Q12418",
    "View of the Colosseum from the Roman Forum": "Q10285",
    "Big Ben and the Houses of Parliament in London": "Q41225",
}


def test_caption_with_exact_title_ranks_that_entity_first(tmp_path, entity_index):
    rows = [{"URL": f"http://x/{i}.jpg", "TEXT": t} for i, t in enumerate(EXACT_TITLE_CASES)]
    captions = write_parquet(tmp_path / "captions.parquet", rows)
    out = tmp_path / "out"
    select_candidates.run(
        [
            "--entity_index", entity_index, "--captions", captions, "--output", str(out),
            "--per_caption_entities", "1", "--k", "10", "--min_score", "0",
        ]
    )
    got = {r["caption"]: r["qid"] for r in read_candidates(out)}
    assert got == EXACT_TITLE_CASES


def test_img2dataset_ready_output_and_ranks(tmp_path, entity_index):
    rows = [
        {"URL": "http://x/a.jpg", "TEXT": "Eiffel Tower", "WIDTH": 10, "HEIGHT": 20, "similarity": 0.3},
        {"URL": "http://x/b.jpg", "TEXT": "eiffel tower at night, paris", "WIDTH": 10, "HEIGHT": 20, "similarity": 0.3},
        {"URL": "http://x/c.jpg", "TEXT": "the eiffel tower seen from a boat on the seine", "WIDTH": 1, "HEIGHT": 2, "similarity": 0.3},
        {"URL": "http://x/d.jpg", "TEXT": "kitchen interior with white cabinets", "WIDTH": 1, "HEIGHT": 2, "similarity": 0.3},
    ]
    captions = write_parquet(tmp_path / "laion.parquet", rows)
    out = tmp_path / "out"
    summary = select_candidates.run(
        [
            "--entity_index", entity_index, "--captions", captions, "--output", str(out),
            "--k", "2", "--keep_columns", "similarity", "--min_score", "0.4",
        ]
    )
    files = sorted(out.glob("candidates-*.parquet"))
    schema = pq.read_schema(files[0])
    for col in ("key", "url", "caption", "qid", "title", "score", "rank"):
        assert col in schema.names
    assert "image" not in schema.names  # caption-only corpus: img2dataset downloads the images
    got = sorted((r["rank"], r["url"], r["qid"]) for r in read_candidates(out))
    # K = 2: the two best Eiffel captions; the kitchen caption matches nothing above 0.4.
    assert [(rank, qid) for rank, _, qid in got] == [(1, "Q243"), (2, "Q243")]
    assert "http://x/d.jpg" not in {u for _, u, _ in got}
    assert json.loads(read_candidates(out)[0]["meta_json"]) == {"similarity": 0.3}
    assert summary["derived"]["proposals_not_in_top_k"] >= 1
    assert summary["count_check"] == "ok"


def test_parquet_with_image_column(tmp_path, entity_index):
    """img2dataset's parquet output: key / caption / url / status / jpg."""
    rows = [
        {"key": "k1", "caption": "Golden Gate Bridge", "url": "http://g/1", "status": "success", "jpg": draw_image(1)},
        {"key": "k2", "caption": "golden gate bridge from baker beach", "url": "http://g/2", "status": "failed_to_download", "jpg": None},
        {"key": "k3", "caption": "Mount Everest base camp", "url": "http://g/3", "status": "success", "jpg": draw_image(3)},
    ]
    path = write_parquet(tmp_path / "img.parquet", rows)
    out = tmp_path / "out"
    summary = select_candidates.run(
        ["--entity_index", entity_index, "--captions", path, "--caption_format", "parquet", "--output", str(out)]
    )
    got = {r["key"]: r for r in read_candidates(out)}
    # Corpus keys are qualified by their file (its path below the inputs' folder).
    assert set(got) == {"img/k1", "img/k3"}
    assert got["img/k1"]["image"] == rows[0]["jpg"] and got["img/k3"]["title"] == "Mount Everest"
    assert [r["reason"] for r in read_rejects(out) if r["stage"] == "read_captions"] == ["download_failed"]
    assert summary["count_check"] == "ok"


def test_one_image_one_entity_on_real_model(tmp_path, entity_index):
    """An image whose two captions name two entities goes to one of them only (the same
    key twice in one tar with the same bytes is one image with two captions)."""
    samples = [
        {"key": "both", "jpg": draw_image(5), "txt": "Jaguar", "json": {"url": "http://j/1"}},
        {"key": "cat", "jpg": draw_image(6), "txt": "a cat", "json": {"url": "http://j/2"}},
        {"key": "both", "jpg": draw_image(5), "txt": "Jaguar Cars"},
    ]
    write_webdataset(tmp_path / "a.tar", samples)
    out = tmp_path / "out"
    summary = select_candidates.run(
        ["--entity_index", entity_index, "--captions", str(tmp_path / "*.tar"), "--caption_format", "webdataset",
         "--per_caption_entities", "1", "--output", str(out)]
    )
    rows = read_candidates(out)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == ["a/both", "a/cat"]
    jaguars = {"Q35694", "Q30055"}
    winner = next(r for r in rows if r["key"] == "a/both")
    assert winner["qid"] in jaguars and winner["image"] == draw_image(5)
    lost = [r for r in read_rejects(out) if r["reason"] == "assigned_to_other_entity"]
    assert [r["key"] for r in lost] == ["a/both"]
    assert summary["counters"]["proposals_lost_to_other_entity"] == len(lost)


def test_misuse_gives_clear_errors(tmp_path, entity_index):
    with pytest.raises(UsageError, match="--entity_index: .* is not an entity index"):
        select_candidates.run(["--entity_index", str(tmp_path), "--captions", "x", "--output", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--captions: no file matches"):
        select_candidates.run(["--entity_index", entity_index, "--captions", str(tmp_path / "none*.parquet"), "--output", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--k must be >= 1"):
        select_candidates.run(["--entity_index", entity_index, "--captions", "x", "--k", "0", "--output", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--embed_tokens_per_pass must be 0"):
        select_candidates.run(["--entity_index", entity_index, "--captions", "x", "--embed_tokens_per_pass", "-1",
                               "--output", str(tmp_path / "o")])
    # From the command line: an unknown flag names itself and exits 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.select_candidates", "--entity_index", entity_index,
         "--captions", "x", "--output", str(tmp_path / "o"), "--top_k", "5"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "--top_k" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.select_candidates", "--entity_index", str(tmp_path / "missing"),
         "--captions", "x", "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "build_entity_index" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_shared_index_across_processes_gives_same_result(tmp_path, entity_index):
    """--share_index yes serves the faiss index from one process through Beam's
    multi-process shared model; results must equal the in-process path."""
    rows = [{"URL": f"http://s/{i}.jpg", "TEXT": t} for i, t in enumerate(EXACT_TITLE_CASES)]
    captions = write_parquet(tmp_path / "captions.parquet", rows)
    got = {}
    for mode in ("no", "yes"):
        out = tmp_path / mode
        select_candidates.run(
            ["--entity_index", entity_index, "--captions", captions, "--output", str(out), "--share_index", mode]
        )
        got[mode] = sorted((r["key"], r["qid"], r["rank"], round(r["score"], 5)) for r in read_candidates(out))
    assert got["yes"] == got["no"] and len(got["no"]) == len(EXACT_TITLE_CASES)


def test_ivf_index_and_bad_factory(tmp_path, catalog_path):
    from pipelines import build_entity_index

    manifest = build_entity_index.run(
        ["--entities", catalog_path, "--output", str(tmp_path / "ivf"), "--index_factory", "IVF2,Flat"]
    )
    index = faiss.read_index(str(tmp_path / "ivf" / "entities.faiss"))
    assert manifest["index_factory"] == "IVF2,Flat" and index.ntotal == 16 and index.is_trained
    with pytest.raises(UsageError, match="--index_factory 'NotAnIndex'"):
        build_entity_index.run(
            ["--entities", catalog_path, "--output", str(tmp_path / "bad"), "--index_factory", "NotAnIndex"]
        )
