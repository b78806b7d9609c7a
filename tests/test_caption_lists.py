"""select_candidates on the caption lists corpora ship as: CSV, TSV (CC3M / CC12M: caption
<TAB> url, no header) and JSON lines, plain or gzip. The same rows select the same (url,
entity) pairs as LAION Parquet; bad lines are rejects with their reason, and the counts add
up."""

import gzip
import json

import pytest

from pipelines import select_candidates
from tests.helpers import read_candidates, read_rejects, write_parquet

CAPTIONS = [
    ("Eiffel Tower", "http://x/a.jpg"),
    ("eiffel tower at night, paris", "http://x/b.jpg"),
    ('the "iron lady": eiffel tower seen from a boat on the seine', "http://x/c.jpg"),
    ("kitchen interior with white cabinets", "http://x/d.jpg"),
    ("Big Ben and the houses of parliament, london", "http://x/e.jpg"),
    ("big ben clock tower at dusk", "http://x/f.jpg"),
]


def _pairs(out) -> list:
    return sorted((r["url"], r["qid"], r["rank"]) for r in read_candidates(out))


def _select(entity_index, captions, out, *extra):
    return select_candidates.run(["--entity_index", entity_index, "--captions", str(captions), "--output", str(out),
                                  "--k", "2", "--min_score", "0.4", *extra])


@pytest.fixture(scope="module")
def laion(tmp_path_factory, entity_index):
    tmp = tmp_path_factory.mktemp("lists")
    path = write_parquet(tmp / "laion.parquet", [{"URL": u, "TEXT": t} for t, u in CAPTIONS])
    summary = _select(entity_index, path, tmp / "laion_out")
    pairs = _pairs(tmp / "laion_out")
    assert len(pairs) == 4 and summary["count_check"] == "ok"
    return pairs


def test_cc3m_style_tsv_selects_what_the_same_rows_as_parquet_select(tmp_path, entity_index, laion):
    tsv = tmp_path / "cc3m.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.write("".join(f"{t}\t{u}\n" for t, u in CAPTIONS))
    summary = _select(entity_index, tsv, tmp_path / "out", "--caption_format", "tsv", "--csv_header", "no")
    assert _pairs(tmp_path / "out") == laion
    assert summary["counters"]["captions_rows_read"] == len(CAPTIONS) == summary["counters"]["captions_rows_ok"]
    assert summary["count_check"] == "ok"


@pytest.mark.slow
def test_csv_with_a_header_and_jsonl_select_the_same(tmp_path, entity_index, laion):
    import csv

    with open(tmp_path / "list.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_url", "alt_text", "width"])
        for t, u in CAPTIONS:
            w.writerow([u, t, 640])
    _select(entity_index, tmp_path / "list.csv", tmp_path / "csv_out", "--caption_format", "csv",
            "--text_col", "alt_text", "--url_col", "image_url")
    assert _pairs(tmp_path / "csv_out") == laion
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"caption": t, "url": u, "n": [1]}) + "\n" for t, u in CAPTIONS))
    _select(entity_index, tmp_path / "list.jsonl", tmp_path / "jsonl_out", "--caption_format", "jsonl")
    assert _pairs(tmp_path / "jsonl_out") == laion


@pytest.mark.slow
def test_bad_lines_are_rejects_with_their_reason(tmp_path, entity_index):
    good = "".join(f"{t}\t{u}\n" for t, u in CAPTIONS)
    raw = (good.encode()
           + b"caf\xe9 in paris\thttp://x/bad-utf8.jpg\n"          # not UTF-8
           + b"\n"                                                  # blank: no row
           + ("x" * 20_000).encode() + b"\thttp://x/long.jpg\n"    # over 4 x --max_caption_chars
           + b"\thttp://x/empty.jpg\n"                              # empty caption
           + b"eiffel tower only a caption\n")                      # no URL: keyed by its line
    (tmp_path / "a.tsv").write_bytes(raw)
    (tmp_path / "b.jsonl").write_text('{"caption": "big ben", "url": "http://x/g.jpg"}\n[1, 2]\n{"caption": \n')
    summary = _select(entity_index, f"{tmp_path}/a.tsv,{tmp_path}/b.jsonl", tmp_path / "out", "--caption_format", "tsv",
                      "--csv_header", "no", "--max_caption_chars", "200")
    # The .jsonl file is read as TSV here (one format per run): its lines have no URL column.
    c = summary["counters"]
    rejects = read_rejects(tmp_path / "out")
    reasons = sorted(r["reason"] for r in rejects if r["stage"] == "read_captions")
    assert reasons == ["bad_utf8", "caption_too_long", "empty_caption"]
    # 6 good lines, 1 with only a caption, 3 bad ones, 3 lines of b.jsonl read as captions.
    assert c["captions_rows_read"] == c["captions_rows_ok"] + 3 == len(CAPTIONS) + 1 + 3 + 3
    assert summary["count_check"] == "ok"
    # JSON lines: an array and a broken object are rejects; the good line is read.
    summary = _select(entity_index, tmp_path / "b.jsonl", tmp_path / "out_json", "--caption_format", "jsonl")
    reasons = sorted(r["reason"] for r in read_rejects(tmp_path / "out_json") if r["stage"] == "read_captions")
    assert reasons == ["bad_json", "not_an_object"]
    assert summary["counters"]["captions_rows_read"] == 3 and summary["count_check"] == "ok"


@pytest.mark.slow
def test_a_csv_without_the_caption_column_is_one_reject_for_all_its_rows(tmp_path, entity_index):
    (tmp_path / "l.csv").write_text("url,text\nhttp://x/a.jpg,Eiffel Tower\nhttp://x/b.jpg,Big Ben\n")
    summary = _select(entity_index, tmp_path / "l.csv", tmp_path / "out", "--caption_format", "csv")
    [r] = [r for r in read_rejects(tmp_path / "out") if r["stage"] == "read_captions"]
    assert r["reason"] == "missing_column" and r["count"] == 2 and "--text_col" in r["detail"]
    assert summary["counters"]["captions_rows_read"] == 2 and summary["count_check"] == "ok"


def test_csv_flags_only_for_csv_and_tsv(tmp_path, entity_index):
    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--csv_header / --csv_columns only apply"):
        _select(entity_index, tmp_path / "x.parquet", tmp_path / "o", "--csv_header", "no")
