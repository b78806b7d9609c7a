"""pipelines.compare_runs on two refine runs of the same input whose answers differ where the
test planted it: the confusion matrix, the agreements and Cohen's kappa equal a hand
computation, and the disagreements page lists exactly the disagreeing samples."""

import json

import pytest

from pipelines import compare_runs, refine
from tests.fake_llm_server import FakeLLMServer
from tests.test_refine import base_args, write_samples

# key: (candidate, caption); the caption's "sN" is what each server's script answers by.
CASES = {f"s{i}": (q, f"photo s{i} of the place") for i, q in enumerate(
    ["Q243", "Q9202", "Q243", "Q243", "Q146", "Q146", "Q146", "Q9202"], start=1)}
# Run A and run B answer differently on purpose:
#   s1, s2  correct / correct              s5  not_an_entity / correct
#   s3      correct / corrected (Taj)      s6  not_an_entity / not_an_entity
#   s4      corrected (Taj) / corrected    s7  ungrounded / correct
#                                          s8  correct / not_an_entity
SCRIPT_A = {"s4 ": "[[CORRECT_TO:taj mahal]]", "s5 ": "[[NOTENTITY]]", "s6 ": "[[NOTENTITY]]",
            "s7 ": "[[CORRECT_TO:Zorblax Quantum Teapot 9000]]"}
SCRIPT_B = {"s3 ": "[[CORRECT_TO:taj mahal]]", "s4 ": "[[CORRECT_TO:taj mahal]]", "s6 ": "[[NOTENTITY]]", "s8 ": "[[NOTENTITY]]"}


@pytest.mark.slow
def test_compare_runs_reports_the_planted_disagreements(tmp_path, catalog_path, entity_index, capsys):
    inputs = write_samples(tmp_path / "s.parquet", CASES)
    outs = {}
    for name, script in (("a", SCRIPT_A), ("b", SCRIPT_B)):
        with FakeLLMServer(script=script) as server:
            outs[name] = tmp_path / name
            refine.run(base_args(tmp_path, catalog_path, entity_index, inputs, outs[name], tmp_path / f"cache_{name}")
                       + ["--llm_backend", "openai", "--endpoint", server.url, "--model", f"model-{name}"])
    result = compare_runs.run([str(outs["a"]), str(outs["b"]), "--output", str(tmp_path / "cmp")])
    c = result["confusion"]
    assert result["samples"] == 8 and result["outcomes"] == ["correct", "corrected", "not_an_entity", "ungrounded"]
    assert c["correct"] == {"correct": 2, "corrected": 1, "not_an_entity": 1, "ungrounded": 0}
    assert c["corrected"] == {"correct": 0, "corrected": 1, "not_an_entity": 0, "ungrounded": 0}
    assert c["not_an_entity"] == {"correct": 1, "corrected": 0, "not_an_entity": 1, "ungrounded": 0}
    assert c["ungrounded"] == {"correct": 1, "corrected": 0, "not_an_entity": 0, "ungrounded": 0}
    # By hand: 4 of 8 outcomes agree; by chance A (4, 1, 2, 1) x B (4, 2, 2, 0) / 64 = 22/64.
    po, pe = 4 / 8, (4 * 4 + 1 * 2 + 2 * 2 + 1 * 0) / 64
    assert result["outcome_agreement"] == result["agreement"] == 0.5
    assert result["kappa"] == pytest.approx((po - pe) / (1 - pe))
    # Both kept s1-s4; s3's entities differ.
    assert result["label_agreement"] == {"both_kept": 4, "same_qid": 0.75}
    assert sorted(d["key"] for d in result["disagreements"]) == ["s3", "s5", "s7", "s8"]
    assert result["runs"]["a"]["model"] == "model-a" and result["runs"]["b"]["rejected_share"] == 0.25
    assert result["runs"]["a"]["rejected_share"] == 0.375 and result["runs"]["a"]["mean_qa_pairs"] == 3
    # The page lists exactly those samples, with an image for each (one run kept it).
    page = (tmp_path / "cmp" / "disagreements.html").read_text()
    listed = [k for k in CASES if f"<div class=k>{k}</div>" in page]
    assert listed == ["s3", "s5", "s7", "s8"] and page.count("<img src='data:image/") == 4
    card = (tmp_path / "cmp" / "README.md").read_text()
    assert "Cohen's kappa of the outcomes" in card and "| not_an_entity | 1 | 0 | 1 | 0 |" in card
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["kappa"] == pytest.approx(result["kappa"]) and len(saved["disagreements"]) == 4
    assert "4 disagreements" in capsys.readouterr().out


def test_compare_runs_refuses_what_it_cannot_compare(tmp_path):
    assert compare_runs.main([str(tmp_path), str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert compare_runs.main([str(tmp_path / "x"), str(tmp_path / "y"), "--output", str(tmp_path / "o")]) == 2
