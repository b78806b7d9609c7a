"""The README's first command runs the demo; this runs the same entry point once, with the
same (default) arguments, and checks what it made: the data, the dataset cards, the viewer
in a real browser, and that the README shows exactly what the demo prints."""

import glob
import json
import os
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(demo_run):
    return demo_run


def test_demo_end_to_end(run):
    tmp_path, summary = run
    assert summary["count_check"] == "ok"
    printed = summary["printed"]
    assert "summary of the whole chain" in printed and "rejected" in printed
    rows = pq.read_table(glob.glob(str(tmp_path / "candidates" / "candidates-*.parquet"))).to_pylist()
    assert rows and all(r["image"] for r in rows)
    assert len({r["key"] for r in rows}) == len(rows)
    titles = {r["title"] for r in rows}
    assert {"Eiffel Tower", "Statue of Liberty", "Taj Mahal"} <= titles
    counts = {}
    for qid in (r["qid"] for r in rows):
        counts[qid] = counts.get(qid, 0) + 1
    assert max(counts.values()) <= 10
    index_manifest = json.load(open(tmp_path / "entity_index" / "manifest.json"))
    assert index_manifest["num_entities"] == 322
    assert index_manifest["counters"]["rejected_dedup_duplicate_qid"] == 2
    # The three broken demo captions are rejected with their reasons.
    reasons = set()
    for path in glob.glob(str(tmp_path / "candidates" / "rejected" / "read_captions" / "*.jsonl")):
        reasons |= {json.loads(line)["reason"] for line in open(path)}
    assert reasons == {"empty_caption", "bad_utf8", "caption_too_long"}
    # Decontamination: every exact, re-encoded and resized evaluation copy is caught, and
    # nothing else is dropped; the shards hold exactly the rest, in all three formats.
    dec = summary["decontaminate"]
    assert dec["count_check"] == "ok"
    assert "exact      4/4 caught" in printed and "reencoded  4/4 caught" in printed and "resized    4/4 caught" in printed
    assert "other images dropped: 0" in printed
    assert dec["counters"]["decontaminate_dropped"] == 12
    shards = tmp_path / "shards"
    kept = pq.read_table(glob.glob(str(shards / "samples-*.parquet"))).num_rows
    assert kept == len(rows) - 12 == dec["counters"]["written_samples_parquet"]
    assert glob.glob(str(shards / "samples-*.tfrecord")) and glob.glob(str(shards / "samples-*.tar"))
    # REW with the replay backend: every request is answered from the demo cache (no
    # not_in_cache), corrections are grounded, and the counts add up.
    rew = summary["refine"]
    assert rew["count_check"] == "ok" and rew["requests_sent"] == 0
    assert "not_in_cache" not in json.dumps(rew["rejects"])
    refined = pq.read_table(glob.glob(str(tmp_path / "rew" / "samples-*.parquet"))).to_pylist()
    assert len(refined) == rew["counters"]["samples_refined"] == 25
    corrected = [r for r in refined if r["changed"]]
    assert len(corrected) == 10 and all(r["qid"] != r["candidate_qid"] and r["verdict"] == "corrected" for r in corrected)
    assert all(r["rationale"] and len(json.loads(r["qa_json"])) == 3 for r in refined)
    # Training stage: codes, a tiny GIT trained on the REW shards, predictions, OVEN score.
    trained = summary["train"]
    assert trained["codes"]["unique"] and trained["codes"]["entities"] == 322
    assert trained["train"]["last_loss"] < 0.7 * trained["train"]["first_loss"]
    m = trained["metrics"]
    assert m["coverage"] == 100.0 and trained["predict"]["annotations"] == 2 * (25 + 10)
    # Seen = the training images (memorised well above the 1/322 chance); unseen = 0.
    assert m["entity_seen"] >= 40 and m["entity_unseen"] == 0.0
    assert "entity_val_seen" in printed and "final" in printed


def test_demo_outputs_are_tidy(run):
    out, summary = run
    # No empty reject files; a reject reason lives in one output only (the codes are built
    # from the entity index, so the duplicate QIDs are the index's rejects alone).
    reject_files = glob.glob(str(out / "**" / "rejected" / "*" / "*.jsonl"), recursive=True)
    assert reject_files and all(os.path.getsize(p) > 0 for p in reject_files)
    seen = {}
    for path in reject_files:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            seen.setdefault((r["stage"], r["reason"]), set()).add(os.path.relpath(path, out).split(os.sep)[0])
    assert all(len(folders) == 1 for folders in seen.values()), seen
    assert not os.path.exists(out / "codes" / "rejected")
    # Every output folder has a manifest and a card, the model folder included.
    for folder in ("entity_index", "candidates", "shards", "rew", "codes", "model"):
        assert (out / folder / "manifest.json").exists() and (out / folder / "README.md").exists(), folder
    assert json.load(open(out / "model" / "manifest.json"))["kind"] == "model"
    # The demo is recipes/demo.yaml plus its printing: the recipe it ran is in its output,
    # every stage ran, and the recipe run again on that output has nothing left to do.
    from transforms.run import chain, recipe

    assert (out / "recipe.yaml").read_text() == open(os.path.join(ROOT, "recipes", "demo.yaml")).read()
    stages = json.load(open(out / "chain.json"))["stages"]
    assert [s["status"] for s in stages] == ["ran"] * 11, stages
    assert all(s["count_check"] == "ok" for s in stages if "count_check" in s)
    again = chain.plan(recipe.load(os.path.join(ROOT, "recipes", "demo.yaml"), str(out)), set())
    assert [d.reason for d in again if d.run] == []
    # The summary of the whole chain links every stage's card and holds what was printed.
    chain = (out / "README.md").read_text(encoding="utf-8")
    for folder in ("entity_index", "candidates", "shards", "rew", "codes", "model"):
        assert f"]({folder}/README.md)" in chain
    assert "](rew/viewer.html)" in chain
    printed = summary["printed"].split("\nsummary of the whole chain")[0]
    assert printed.strip() and printed in chain
    # Thresholds print as given, not as float32 noise.
    assert "0.9990000" not in (out / "shards" / "README.md").read_text() and "0.9990000" not in summary["printed"]


def test_every_reject_with_a_qid_has_its_title(run):
    """A reject that names an entity names it by title too (the viewer and the audit show it,
    not "(no entity)" next to a QID), in every output of the chain."""
    out, _ = run
    seen, missing = 0, []
    for path in glob.glob(str(out / "**" / "rejected" / "**" / "*.jsonl"), recursive=True):
        for line in open(path, encoding="utf-8"):
            if not line.strip():
                continue
            r = json.loads(line)
            rec = json.loads(r.get("record_json") or "{}")
            if isinstance(rec, dict) and (rec.get("qid") or rec.get("wikidata_id")):
                seen += 1
                if not (rec.get("title") or rec.get("wikipedia_title")):
                    missing.append((r["stage"], r["reason"], r.get("key")))
    assert seen >= 12 + 5 and not missing, missing[:5]


def _normalise(text: str, out: str) -> list[str]:
    text = text.replace(out, "demo_output")
    text = re.sub(r"\d+ samples/s", "N samples/s", text)
    text = re.sub(r"Done in \d+ s", "Done in N s", text)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def test_docs_show_what_the_demo_prints(run):
    """docs/demo.md's demo output block is the demo's real output (paths under the output
    folder and the two timings aside), and the README's stage lines are its stage lines:
    the demo is deterministic, and the docs true."""
    out, summary = run
    page = open(os.path.join(ROOT, "docs", "demo.md"), encoding="utf-8").read()
    blocks = re.findall(r"<!-- demo output -->\n```text\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1, "docs/demo.md must hold one ```text block after <!-- demo output -->"
    expected = _normalise(blocks[0], "demo_output")
    actual = _normalise(summary["printed"], str(out))
    assert actual == expected, "\n".join(
        f"{'-' if tag == '-' else '+'} {line}" for tag, line in _diff(expected, actual)
    ) + "\n(docs/demo.md's demo output differs from what the demo printed: paste the demo's output)"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    shown = re.findall(r"## What the demo prints.*?```text\n(.*?)```", readme, flags=re.S)
    assert len(shown) == 1, "README.md must show the demo's stage lines in one ```text block"
    stages = [line for line in actual if re.match(r"^[1-8] ", line)]
    assert len(stages) == 8 and _normalise(shown[0], "demo_output") == stages


@pytest.mark.slow
def test_docs_compare_walkthrough_is_what_it_prints(run, capsys, tmp_path):
    """docs/outputs.md's compare-then-decide walk-through on the demo's outputs: its commands
    run as written (on this session's demo folder), print what the page shows, and the
    confusion matrix the page quotes is the comparison's."""
    import shlex

    from pipelines import compare_runs, refine

    out, _ = run
    page = open(os.path.join(ROOT, "docs", "outputs.md"), encoding="utf-8").read()
    blocks = re.findall(r"<!-- compare walk-through -->\n```bash\n(.*?)```\n\nprints:\n\n```text\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1, "docs/outputs.md must hold the walk-through's ```bash block and what it prints"
    commands, printed = blocks[0]
    lines = [c for c in commands.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]
    assert [shlex.split(c)[:3] for c in lines] == [["python", "-m", "pipelines.refine"], ["python", "-m", "pipelines.compare_runs"]]
    # What the walk-through writes goes to this test's folder; it reads the demo's outputs.
    mine = {"demo_output/rew_cheap": str(tmp_path / "rew_cheap"), "demo_output/compare": str(tmp_path / "compare")}

    def local(arg: str) -> str:
        for doc, path in mine.items():
            arg = arg.replace(doc, path)
        return arg.replace("demo_output", str(out))

    argv = [[local(a) for a in shlex.split(c)[3:]] for c in lines]
    refine.run(argv[0])
    capsys.readouterr()
    result = compare_runs.run(argv[1])
    text = capsys.readouterr().out
    for doc, path in mine.items():
        text = text.replace(path, doc)
    actual = _normalise(text, str(out))
    assert actual == _normalise(printed, "demo_output"), "\n".join(actual)
    table = _md_rows(page.split("<!-- compare walk-through -->", 1)[1], "The demo's confusion matrix")
    assert {r[0]: [int(x) for x in r[1:]] for r in table} == {o: list(result["confusion"][o].values()) for o in result["confusion"]}


def _diff(a: list[str], b: list[str]):
    import difflib

    for line in difflib.unified_diff(a, b, "README", "demo", lineterm="", n=1):
        if line.startswith(("-", "+")) and not line.startswith(("---", "+++")):
            yield line[0], line[1:]


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def _md_rows(card: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `## heading`."""
    part = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip().strip("`") for c in row.strip("|").split("|")] for row in rows[2:]]


@pytest.mark.parametrize("folder", ["candidates", "shards", "rew", "entity_index", "codes", "model"])
def test_dataset_cards(run, folder):
    out, _ = run
    root = out / folder
    manifest = json.load(open(root / "manifest.json"))
    card = (root / "README.md").read_text(encoding="utf-8")
    # Hugging Face dataset-card front matter.
    assert card.startswith("---\n")
    front = card.split("---\n", 2)[1]
    assert "license: unknown" in front and "size_categories:" in front and "task_categories:" in front
    # Every plot the card shows exists and is a real PNG of a sensible size.
    plots = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", card)
    assert plots, f"{folder}: no plots"
    for rel in plots:
        w, h = _png_size(root / rel)
        assert w >= 300 and h >= 150
    counters = manifest.get("counters", {})
    if counters:
        # The counts table is the manifest's counters, value for value.
        table = {k: int(v.replace(",", "")) for k, v in _md_rows(card, "Counts")}
        assert table == {k: v for k, v in counters.items() if not k.startswith("shuffle_")}
    rejected = {k: v for k, v in counters.items() if k.startswith("rejected_") and not k.endswith("_files") and v}
    if rejected:
        rows = _md_rows(card, "Rejects by reason")
        assert {f"rejected_{s}_{r}": int(n.replace(",", "")) for s, r, n in rows} == rejected
    if folder == "rew":
        verdicts = {k: int(v) for k, v in _md_rows(card, "LLM verdicts")}
        assert verdicts == manifest["verdicts"]
        assert {"plots/verdicts.png", "plots/grounding_methods.png", "plots/changed_labels.png"} <= set(plots)
    if folder == "shards":
        assert "plots/decontamination.png" in plots and "entityforge_models:\n  clip: " in front
    if folder == "candidates":
        assert {"plots/retrieval_score.png", "plots/images_per_entity.png", "plots/top_entities.png"} <= set(plots)
        top = _md_rows(card, "Most frequent entities")
        rows = pq.read_table(glob.glob(str(root / "candidates-*.parquet")), columns=["qid"]).column("qid").to_pylist()
        assert int(top[0][2]) == max(rows.count(q) for q in set(rows))
    if folder == "model":
        assert "plots/loss.png" in plots


@pytest.mark.parametrize("folder", ["shards", "rew"])
def test_datasets_loads_the_images_as_pictures(run, folder, tmp_path, monkeypatch):
    """`datasets.load_dataset(<folder>)` reads the card's `dataset_info` and decodes `image`
    to PIL images; pyarrow (and so DuckDB and the trainer) still reads plain bytes."""
    import io

    import datasets
    import pyarrow as pa
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = run
    root = out / folder
    ds = datasets.load_dataset(str(root), split="train", cache_dir=str(tmp_path / "hf"))
    files = sorted(glob.glob(str(root / "samples-*.parquet")))
    table = pq.read_table(files)
    assert table.schema.field("image").type == pa.binary()
    listed = [e for e in json.load(open(root / "manifest.json"))["files"] if e["format"] == "parquet"]
    assert len(ds) == table.num_rows == sum(f["rows"] for e in listed for f in e["files"]) > 0
    assert isinstance(ds.features["image"], datasets.Image)
    by_key = {k: (b, w, h) for k, b, w, h in zip(*(table.column(c).to_pylist() for c in ("key", "image", "width", "height")))}
    for row in ds.select(range(min(5, len(ds)))):
        im = row["image"]
        assert isinstance(im, Image.Image)
        data, w, h = by_key[row["key"]]
        assert im.size == (w, h)
        assert Image.open(io.BytesIO(data)).convert("RGB").tobytes() == im.convert("RGB").tobytes()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on this machine: install Debian's `chromium` package (.ci/run does)")


def _browser(*args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _rendered(url: str) -> tuple[str, dict]:
    dom = _browser("--dump-dom", url).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dom, dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


@pytest.mark.slow
def test_viewer_in_a_real_browser(run, tmp_path):
    out, _ = run
    page = out / "rew" / "viewer.html"
    html = page.read_text(encoding="utf-8")
    # Self-contained: no request leaves the page (images are data URIs, no external script).
    assert not re.search(r"""(src|href)=["']?https?://""", html)
    url = page.as_uri()
    dom, state = _rendered(url)
    refined = pq.read_table(glob.glob(str(out / "rew" / "samples-*.parquet"))).to_pylist()
    rejected = json.load(open(out / "rew" / "manifest.json"))["counters"]["rejects_emitted"]
    # Every sampled record renders as a card with its image decoded by the browser.
    assert int(state["shown"]) == len(refined) + rejected
    assert int(state["images-loaded"]) == len(refined) + rejected
    assert dom.count('class="card kept"') == len(refined) and dom.count('class="card rejected"') == rejected
    assert "Mars" in dom and "Hubble Space Telescope" in dom
    # A filter changes what is shown: only the corrected labels, then only the rejects.
    _, corrected = _rendered(url + "#verdict=corrected")
    assert int(corrected["shown"]) == sum(r["verdict"] == "corrected" for r in refined) == 10
    _, rejects = _rendered(url + "#show=rejected")
    # A reject's image is read back from the Parquet input it came from (the decontaminated shards).
    assert int(rejects["shown"]) == rejected and int(rejects["images-loaded"]) == rejected
    _, by_entity = _rendered(url + "#entity=q111")
    assert int(by_entity["shown"]) == sum(r["qid"] == "Q111" or r["candidate_qid"] == "Q111" for r in refined) >= 1
    # A near-duplicate reject of decontaminate shows its own image (a thumbnail its reject
    # kept, <= 8 KB) beside the evaluation image it matched, both decoded by the browser,
    # and its entity's title.
    import base64
    from urllib.parse import quote

    near = [json.loads(line) for p in glob.glob(str(out / "shards" / "rejected" / "decontaminate" / "*.jsonl"))
            for line in open(p) if line.strip()]
    near = [r for r in near if r["reason"] == "near_duplicate_of_eval"]
    assert near and all(r["thumbnail"].startswith("data:image/jpeg;base64,") for r in near)
    sizes = [len(base64.b64decode(r["thumbnail"].split(",", 1)[1])) for r in near]
    assert max(sizes) <= 8192 and all(json.loads(r["record_json"])["title"] for r in near)
    print(f"\nnear-duplicate reject thumbnails: {len(sizes)}, mean {sum(sizes) / len(sizes):.0f} B, max {max(sizes)} B")
    shards_url = (out / "shards" / "viewer.html").as_uri()
    _, dups = _rendered(shards_url + "#show=rejected&reason=" + quote("decontaminate / near_duplicate_of_eval"))
    assert int(dups["shown"]) == len(near) == int(dups["images-loaded"]) == int(dups["eval-images-loaded"])
    # A screenshot of the page, kept with the test's files.
    shot = tmp_path / "viewer.png"
    _browser(f"--screenshot={shot}", "--window-size=1280,900", url)
    w, h = _png_size(shot)
    assert (w, h) == (1280, 900) and shot.stat().st_size > 20_000
