"""Progress lines of local runs, the trainer's ETA, and cards of outputs too big to read
whole (drawn from a sample that says so)."""

import json
import re

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import direct_pipeline
from transforms.report.card import size_category, write_card
from transforms.report.outputs import read_sample
from transforms.run import progress
from transforms.run.job import run_and_count


def test_progress_line_rates_and_eta():
    line = progress.progress_line("select", 50.0, {"captions_rows_read": 1000, "files_written_rejects": 3, "proposals": 7},
                                  ("captions_rows_read", 4000))
    assert line.startswith("[select 50s] captions_rows_read 1,000 (20/s)")
    # 1,000 of 4,000 in 50 s: 150 s to go.
    assert "25% of 4,000 captions_rows_read, ETA 2m30s" in line
    assert "files_written" not in line and "proposals" not in line
    assert progress.format_duration(3 * 3600 + 125) == "3h02m"
    assert progress.progress_line("x", 1.0, {}) == "[x 1s] starting"


class _Slow(beam.DoFn):
    def process(self, x):
        import time

        time.sleep(0.01)
        progress.counter("items_read").inc()
        yield x


def test_local_run_prints_progress_with_eta(capfd):
    progress.INTERVAL = 0.2
    try:
        p = direct_pipeline()
        _ = p | beam.Create(list(range(120))) | beam.ParDo(_Slow())
        counters, _ = run_and_count(p, "toy", ("items_read", 120))
    finally:
        progress.INTERVAL = 30.0
    assert counters["items_read"] == 120
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("[toy ")]
    assert len(lines) >= 2, lines
    counts = [int(re.search(r"items_read ([\d,]+)", x).group(1).replace(",", "")) for x in lines if "items_read" in x]
    assert counts and counts == sorted(counts) and 0 < counts[-1] <= 120
    assert any("ETA" in x and "of 120 items_read" in x for x in lines)
    # Off after the run: counting no longer tallies, no reporter left behind.
    assert progress._reporter is None and "ENTITYFORGE_PROGRESS" not in __import__("os").environ


def test_progress_off_with_interval_zero(capfd):
    progress.INTERVAL = 0
    try:
        p = direct_pipeline()
        _ = p | beam.Create(list(range(30))) | beam.ParDo(_Slow())
        counters, _ = run_and_count(p, "quiet")
    finally:
        progress.INTERVAL = 30.0
    assert counters["items_read"] == 30
    assert "[quiet" not in capfd.readouterr().err


def _fake_output(tmp_path, files=4, rows=100):
    entries = []
    for i in range(files):
        name = f"samples-{i:05d}-of-{files:05d}.parquet"
        qids = [f"Q{(i * rows + r) % 37 + 1}" for r in range(rows)]
        pq.write_table(pa.table({"key": [f"k{i}-{r}" for r in range(rows)], "qid": qids, "title": [f"T{q}" for q in qids],
                                 "score": [0.3 + 0.5 * r / rows for r in range(rows)]}), tmp_path / name)
        entries.append({"path": name, "rows": rows, "bytes": (tmp_path / name).stat().st_size})
    counters = {"candidates_read": files * rows + 5, "rejected_select_assigned_to_other_entity": 5, "rejects_emitted": 5,
                "written_rejects": 5, "written_candidates": files * rows}
    manifest = {"kind": "candidates", "counters": counters, "count_check": "ok", "files": [{"format": "parquet", "files": entries}],
                "created": "2026-01-01T00:00:00+00:00", "seconds": 1.0, "code_version": "test", "options": {"min_score": 0.3}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_card_of_a_big_output_is_drawn_from_a_spread_sample(tmp_path):
    _fake_output(tmp_path, files=8, rows=100)
    table, n, total = read_sample([(str(tmp_path / f"samples-{i:05d}-of-00008.parquet"), 100) for i in range(8)], ["key"], 250)
    assert total == 800 and n == 250 == table.num_rows
    # Files spread over the output, not only the first ones.
    assert {k.split("-")[0] for k in table.column("key").to_pylist()} - {"k0", "k1"}
    made = write_card(str(tmp_path), max_rows=250, viewer_records=20)
    card = open(made["card"], encoding="utf-8").read()
    assert "(sample of 250 of 800 rows)" in card
    assert "- n<1K" in card
    # Counts come from the manifest, not the sample.
    assert "| `candidates_read` | 805 |" in card
    assert "| select | assigned_to_other_entity | 5 |" in card
    viewer = open(made["viewer"], encoding="utf-8").read()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', viewer, re.S).group(1))
    assert len([r for r in data["records"] if r["kind"] == "kept"]) == 20
    assert data["meta"]["kept_total"] == 800


@pytest.mark.parametrize("n,cat", [(999, "n<1K"), (1000, "1K<n<10K"), (6_000_000, "1M<n<10M"), (2_000_000_000, "1B<n<10B")])
def test_size_categories(n, cat):
    assert size_category(n) == cat


def test_viewer_escapes_untrusted_captions(tmp_path):
    manifest = _fake_output(tmp_path, files=1, rows=3)
    path = tmp_path / "samples-00000-of-00001.parquet"
    t = pq.read_table(path).to_pylist()
    t[0]["title"] = "</script><script>alert(1)</script>"
    pq.write_table(pa.Table.from_pylist(t), path)
    write_card(str(tmp_path), manifest)
    html = (tmp_path / "viewer.html").read_text(encoding="utf-8")
    assert "</script><script>alert(1)" not in html and "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html
