"""pipelines.audit: a stratified, seeded sample in a self-contained page, judgments read back
into precisions that equal a hand computation (weights, Wilson intervals, reviewers'
majority and agreement), and the output's card gains an Audit section."""

import json
import math

import pytest

from pipelines import audit, refine
from tests.fake_llm_server import FakeLLMServer
from tests.test_compare_runs import CASES, SCRIPT_A
from tests.test_refine import base_args, write_samples


@pytest.fixture(scope="module")
def rew(tmp_path_factory, catalog_path, entity_index):
    tmp = tmp_path_factory.mktemp("audit")
    cases = dict(CASES) | {"s9": ("Q243", "photo s9 </script><script>alert(1)</script> of the place"),
                           "s10": ("Q9202", "photo s10 of the place")}
    inputs = write_samples(tmp / "s.parquet", cases)
    with FakeLLMServer(script=SCRIPT_A) as server:
        refine.run(base_args(tmp, catalog_path, entity_index, inputs, tmp / "rew", tmp / "cache")
                   + ["--llm_backend", "openai", "--endpoint", server.url])
    return tmp / "rew"


def _wilson(p, n, z=1.959964):
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_sample_is_stratified_seeded_and_the_page_is_inert(rew):
    made = audit.run([str(rew), "--sample", "6", "--seed", "3"])
    meta = json.loads((rew / "audit" / "audit_sample.json").read_text())
    again = json.loads(json.dumps(meta))
    audit.run([str(rew), "--sample", "6", "--seed", "3"])
    assert json.loads((rew / "audit" / "audit_sample.json").read_text()) == again  # seeded: the same sample
    assert meta["population"] == 10 and meta["sample"] == 6 == made["records"]
    # Every stratum has its size and sample size; weights are N / n.
    assert sum(s["N"] for s in meta["strata"].values()) == 10
    for s in meta["strata"].values():
        assert s["n"] >= 1 and s["weight"] == pytest.approx(s["N"] / s["n"])
    kinds = {r["kind"] for r in meta["records"].values()}
    assert kinds == {"kept", "rejected"}
    page = (rew / "audit" / "audit.html").read_text()
    # A caption cannot close the data's script element or start one of its own.
    assert "</script><script>alert(1)" not in page and page.count("<script") == 2
    assert made["with_image"] == 6  # kept ones from the shards, rejected ones from the input


def test_judgments_become_reweighted_precisions_with_wilson_intervals(rew, tmp_path):
    audit.run([str(rew), "--sample", "10", "--seed", "0"])  # everything: weights 1
    meta = json.loads((rew / "audit" / "audit_sample.json").read_text())
    kept = sorted(k for k, r in meta["records"].items() if r["kind"] == "kept")
    rejected = sorted(k for k, r in meta["records"].items() if r["kind"] == "rejected")
    assert len(kept) == 7 and len(rejected) == 3
    ann = [{"key": k, "judgment": "wrong" if k == kept[0] else "right", "reviewer": "ann"} for k in kept]
    ann += [{"key": rejected[0], "judgment": "wrongly_dropped", "reviewer": "ann"}]
    ann += [{"key": k, "judgment": "rightly_dropped", "reviewer": "ann"} for k in rejected[1:]]
    # Bob agrees but on two: kept[1] wrong (a tie with Ann: unsure, left out), rejected[0] rightly dropped (a tie too).
    bob = [dict(j, reviewer="bob") for j in ann]
    bob[1]["judgment"] = "wrong"
    bob[len(kept)]["judgment"] = "rightly_dropped"
    paths = []
    for name, rows in (("ann", ann), ("bob", bob)):
        p = tmp_path / f"judgments-{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(p))
    res = audit.run([str(rew), "--judgments", ",".join(paths)])
    # Kept: 6 judged (one tie left out), 5 right; every weight 1, so n_eff = 6.
    overall = res["precision"]["overall"]["kept (label right)"]
    lo, hi = _wilson(5 / 6, 6)
    assert (overall["judged"], overall["good"]) == (6, 5) and overall["precision"] == pytest.approx(5 / 6)
    assert (overall["low"], overall["high"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
    dropped = res["precision"]["overall"]["rejected (rightly dropped)"]
    assert (dropped["judged"], dropped["good"]) == (2, 2)
    assert res["unsure"] == 2 and res["reviewers"] == ["ann", "bob"]
    a = res["agreement"][0]
    assert a["records"] == 10 and a["agreement"] == pytest.approx(8 / 10)
    card = (rew / "README.md").read_text()
    assert "## Audit" in card and "Wilson 95 % intervals" in card


def test_reweighting_by_strata(rew, tmp_path):
    """Two strata sampled at different rates: a judged record stands for N_h / n_h records."""
    from transforms.report.audit import weighted_precision

    # 1 record standing for 4 (right) and 2 records standing for 1 each (one right, one wrong).
    got = weighted_precision([(True, 4.0), (True, 1.0), (False, 1.0)])
    n_eff = 6 * 6 / (16 + 1 + 1)
    lo, hi = _wilson(5 / 6, n_eff)
    assert got["precision"] == pytest.approx(5 / 6) and got["effective_n"] == pytest.approx(n_eff, abs=0.01)
    assert (got["low"], got["high"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))


def test_bad_judgment_files_are_named(rew, tmp_path):
    from transforms.errors import UsageError

    audit.run([str(rew), "--sample", "4"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "s1", "judgment": "maybe"}\n')
    with pytest.raises(UsageError, match="line 1 is not a judgment"):
        audit.run([str(rew), "--judgments", str(bad)])


@pytest.mark.slow
def test_the_audit_page_renders_in_a_real_browser(rew):
    """The page's script runs in headless Chromium: the first record is shown with its image
    and label, and the hostile caption stays text. (Judging by key presses needs a WebDriver.)"""
    from tests.test_demo import _browser

    audit.run([str(rew), "--sample", "10", "--seed", "1"])
    dom = _browser("--dump-dom", (rew / "audit" / "audit.html").as_uri()).stdout
    assert "1 / 10" in dom and "0 judged" in dom
    assert 'id="img" alt="" src="data:image/' in dom or "id=\"img\" src=\"data:image/" in dom or 'src="data:image/' in dom
    assert "<script>alert(1)</script>" not in dom.split('id="data"')[0]


@pytest.mark.slow
def test_judging_ten_records_with_the_keyboard_in_chromium(rew, tmp_path):
    """As a person uses it: Chromium driven through its WebDriver (Selenium) opens the page,
    keys judge 10 records, Export downloads the file, and the precision read back from it
    equals a hand computation."""
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from tests.helpers import chrome_driver

    audit.run([str(rew), "--sample", "10", "--seed", "2"])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome_driver(downloads)
    try:
        driver.get((rew / "audit" / "audit.html").as_uri())
        driver.find_element(By.ID, "reviewer").send_keys("selenium")
        driver.find_element(By.ID, "caption").click()  # focus out of the name field
        records = driver.execute_script("return D.records.map(r => [r.key, r.kind, !!r.image])")
        assert len(records) == 10 and all(has_image for _, _, has_image in records)
        # The image is decoded by the browser, not only embedded.
        assert driver.execute_script("const i = document.getElementById('img'); return i.complete && i.naturalWidth > 0")
        expected = {}
        for n, (key, kind, _) in enumerate(records):
            press = ("w" if n == 0 else "r") if kind == "kept" else ("k" if n == 1 else "d")
            ActionChains(driver).send_keys(press).perform()
            expected[key] = (kind, press)
        assert driver.find_element(By.ID, "progress").text == "10 judged"
        driver.save_screenshot(str(tmp_path / "audit.png"))
        driver.find_element(By.ID, "export").click()
        deadline = time.time() + 30
        while not list(downloads.glob("judgments-*.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        driver.quit()
    exported = list(downloads.glob("judgments-*.jsonl"))
    assert [p.name for p in exported] == ["judgments-selenium.jsonl"]
    lines = [json.loads(x) for x in exported[0].read_text().splitlines() if x.strip()]
    assert {j["key"] for j in lines} == set(expected) and {j["reviewer"] for j in lines} == {"selenium"}
    res = audit.run([str(rew), "--judgments", str(exported[0])])
    kept = [k for k, (kind, _) in expected.items() if kind == "kept"]
    right = [k for k in kept if expected[k][1] == "r"]
    got = res["precision"]["overall"]["kept (label right)"]
    assert (got["judged"], got["good"]) == (len(kept), len(right))
    assert got["precision"] == pytest.approx(len(right) / len(kept))  # the whole output was sampled: weights 1
    lo, hi = _wilson(len(right) / len(kept), len(kept))
    assert (got["low"], got["high"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
    assert (tmp_path / "audit.png").stat().st_size > 10_000
