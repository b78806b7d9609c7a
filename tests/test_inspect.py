"""pipelines.inspect: the terminal summary of an output directory tells what the manifest
and the files say (counts, rejects, schema, rows), of a model folder its training, and of
a folder of outputs one line each."""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import build_entity_index
from pipelines import inspect as inspect_cmd
from trainer.train import CONFIG_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_output_model_and_parent_folders(tmp_path, capsys):
    catalog = tmp_path / "catalog.jsonl"
    lines = open(os.path.join(ROOT, "pipelines", "demo_data", "entities.jsonl"), encoding="utf-8").read().splitlines()[:40]
    catalog.write_text("\n".join(lines + [lines[0]]) + "\n")  # one duplicate QID: a reject
    index = tmp_path / "runs" / "entity_index"
    summary = build_entity_index.run(["--entities", str(catalog), "--output", str(index)])
    capsys.readouterr()
    assert inspect_cmd.main([str(index), "--rows", "2"]) == 0
    text = capsys.readouterr().out
    assert f"{index}: entity_index" in text and "count check: ok" in text
    assert re.search(rf"\n  entities_unique +{summary['counters']['entities_unique']}\n", text)
    assert "dedup / duplicate_qid: 1" in text
    assert "schema of entities.parquet (40 rows):" in text and "  qid: string" in text
    first = json.loads(lines[0])
    assert f"  qid: {first['wikidata_id']}" in text and f"  title: {first['wikipedia_title']}" in text
    assert "row 2:" not in text and "row 1:" in text

    model = tmp_path / "runs" / "model"
    ckpt = model / "checkpoints" / "step-0000020"
    os.makedirs(ckpt)
    (ckpt / CONFIG_FILE).write_text(json.dumps({"model_config": "tiny", "entity_target": "code", "max_steps": 20}))
    pq.write_table(pa.table({"qid": ["Q243", "Q9202"], "code": [[5, 9, 2, 1], [7, 3, 1, 1]]}), ckpt / "codes.parquet")
    (model / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 8.0 - s / 10, "lr": 1e-4}) + "\n" for s in (10, 20)))
    (model / "train_summary.json").write_text(json.dumps(
        {"steps": 20, "samples": 160, "first_loss": 7.46, "last_loss": 3.09, "samples_per_s": 128.4,
         "world_size": 1, "skipped_total": 0, "checkpoint": str(ckpt)}))
    assert inspect_cmd.main([str(model)]) == 0
    text = capsys.readouterr().out
    assert "steps 20, samples 160, loss 7.46 -> 3.09, 128.4 samples/s" in text
    assert "log: 2 lines, steps 10..20" in text and "model_config=tiny" in text
    assert "codes: 2 entities" in text and "qid=Q243" in text

    assert inspect_cmd.main([str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "entity_index/" in text and "entity_index" in text and "model/" in text and "20 steps" in text
    assert inspect_cmd.main([str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
