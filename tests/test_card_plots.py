"""The card's histograms break at their thresholds: no dropped image is drawn left of the
decontamination threshold, no kept one right of it, and the retrieval histogram has an
edge at --min_score."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.report.card import bin_edges, write_card
from transforms.schema import Sample, arrow_schema, to_row


def _output(tmp_path, kind, rows, manifest_extra, rejects=()):
    out = tmp_path / kind
    out.mkdir()
    table = pa.Table.from_pylist([to_row(Sample(**r)) for r in rows], schema=arrow_schema(Sample))
    pq.write_table(table, out / "samples-00000-of-00001.parquet")
    manifest = {"kind": kind, "counters": {}, "files": [{"name": "samples", "format": "parquet", "files": [
        {"path": "samples-00000-of-00001.parquet", "rows": len(rows), "bytes": 1}]}], **manifest_extra}
    (out / "manifest.json").write_text(json.dumps(manifest))
    if rejects:
        (out / "rejected" / "decontaminate").mkdir(parents=True)
        (out / "rejected" / "decontaminate" / "rejects-00000-of-00001.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rejects))
    return out


def test_the_decontamination_and_retrieval_histograms_break_at_their_thresholds(tmp_path):
    kept = [0.2 + 0.79 * i / 50 for i in range(50)]  # up to 0.99, all <= the threshold
    rows = [{"key": f"k{i}", "qid": "Q1", "title": "T", "score": 0.31 + 0.6 * i / 50, "max_eval_similarity": s}
            for i, s in enumerate(kept)]
    dropped = [{"stage": "decontaminate", "reason": "near_duplicate_of_eval", "key": f"d{i}",
                "record_json": json.dumps({"similarity": 0.9991 + 0.0001 * i})} for i in range(5)]
    out = _output(tmp_path, "decontaminated_shards", rows, {"threshold": 0.999, "options": {"min_score": 0.3}}, dropped)
    made = write_card(str(out))
    edges = made["bin_edges"]["decontamination"]
    assert 0.999 in edges
    # Every bin lies on one side of the threshold: kept ones below it, dropped ones above.
    i = edges.index(0.999)
    assert max(kept) < edges[i] <= min(json.loads(d["record_json"])["similarity"] for d in dropped)
    assert 0.3 in made["bin_edges"]["retrieval_score"]


def test_bin_edges_keep_equal_widths_around_the_threshold():
    e = bin_edges([0.0, 1.0], 10, 0.33)
    widths = {round(b - a, 9) for a, b in zip(e, e[1:])}
    assert 0.33 in e and len(widths) == 1 and e[0] <= 0.0 and e[-1] >= 1.0
