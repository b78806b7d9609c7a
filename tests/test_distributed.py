"""Every pipeline on Beam's portable runner with separate SDK worker processes gives the
rows of the in-process run, and every pipeline builds a Dataflow job offline whose graph
does not grow with the number of input files (no data is embedded in it)."""

import glob
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import (
    build_codes,
    build_entity_index,
    decontaminate,
    oven_to_shards,
    refine,
    select_candidates,
)
from tests.conftest import write_jsonl
from tests.fake_llm_server import FakeLLMServer
from tests.helpers import draw_image, write_webdataset

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

MULTI = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
DATAFLOW = [
    "--runner", "DataflowRunner", "--dry_run=True", "--no_auth", "--sdk_location", "container",
    "--project", "entityforge-test", "--region", "us-central1",
    "--temp_location", "gs://entityforge-test-bucket/tmp", "--setup_file", os.path.join(os.path.dirname(__file__), "..", "setup.py"),
]
CAPTIONS = [
    "Eiffel Tower at night", "Mona Lisa in the Louvre", "Golden Gate Bridge in fog", "Taj Mahal at sunrise",
    "a cat on a sofa", "Big Ben and Parliament", "the Colosseum in Rome", "Mount Everest summit ridge",
    "kitchen sink stock photo", "jaguar in the jungle", "Statue of Liberty from the ferry", "a dog in the park",
]


def rows_of(folder, pattern="samples-*.parquet", drop=()):
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    assert files, f"nothing matches {pattern} in {folder}"
    rows = []
    for r in pq.read_table(files).to_pylist():
        r = {k: v for k, v in r.items() if k not in drop}
        for k, v in list(r.items()):
            if isinstance(v, bytes):
                r[k] = hashlib.sha256(v).hexdigest()
            elif isinstance(v, float):
                r[k] = round(v, 4)
        rows.append(json.dumps(r, sort_keys=True, default=str))
    return sorted(rows)


def rejects_of(folder):
    out = []
    for p in glob.glob(os.path.join(folder, "rejected", "*", "*.jsonl")):
        with open(p, encoding="utf-8") as f:
            out += [(r["stage"], r["reason"], r["key"]) for r in map(json.loads, f)]
    return sorted(out, key=str)


def both_ways(run, args, tmp_path, name):
    """Run in-process and with two SDK worker processes; both output folders."""
    single, multi = tmp_path / f"{name}_single", tmp_path / f"{name}_multi"
    s = run([*args, "--output", str(single)])
    m = run([*args, "--output", str(multi), *MULTI])
    assert s["count_check"] == m["count_check"] == "ok", (s["count_check"], m["count_check"])
    # Record counters agree; shuffle sizes after batching steps depend on bundle sizes.
    def records(c):
        # How many files a sink writes is the runner's choice, and time is time; the rows are not.
        # Nor are the tokens a provider served from its prefix cache: they depend on what it
        # saw before (the second run's prompts were the first run's too).
        return {k: v for k, v in c.items() if not k.startswith(("shuffle_", "files_written_"))
                and not k.endswith(("_ms_total", "cached_input_tokens"))}

    assert records(s["counters"]) == records(m["counters"])
    assert set(s["shuffles"]) == set(m["shuffles"]) != set()
    return single, multi


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    samples = [{"key": f"{i:09d}", "jpg": draw_image(i), "txt": t, "json": {"url": f"http://c/{i}"}} for i, t in enumerate(CAPTIONS)]
    write_webdataset(root / "00000.tar", samples[:6])
    write_webdataset(root / "00001.tar", samples[6:])
    return root


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, corpus, entity_index):
    out = tmp_path_factory.mktemp("cands")
    select_candidates.run(["--entity_index", entity_index, "--captions", str(corpus), "--caption_format", "webdataset",
                           "--min_score", "0.5", "--output", str(out)])
    return out


def test_build_entity_index_multi_process(tmp_path, catalog_path):
    single, multi = both_ways(build_entity_index.run, ["--entities", catalog_path], tmp_path, "index")
    assert pq.read_table(single / "entities.parquet").to_pylist() == pq.read_table(multi / "entities.parquet").to_pylist()
    np.testing.assert_allclose(np.load(single / "embeddings.npy"), np.load(multi / "embeddings.npy"), atol=1e-5)


def test_select_candidates_multi_process(tmp_path, corpus, entity_index):
    args = ["--entity_index", entity_index, "--captions", str(corpus), "--caption_format", "webdataset", "--min_score", "0.5"]
    single, multi = both_ways(select_candidates.run, args, tmp_path, "select")
    assert rows_of(single, "candidates-*.parquet") == rows_of(multi, "candidates-*.parquet")
    assert len(rows_of(single, "candidates-*.parquet")) >= 8
    assert rejects_of(single) == rejects_of(multi)


def test_decontaminate_multi_process(tmp_path, candidates):
    evals = tmp_path / "eval"
    evals.mkdir()
    first = pq.read_table(sorted(glob.glob(str(candidates / "candidates-*.parquet")))).to_pylist()[0]
    (evals / "copy.jpg").write_bytes(first["image"])
    (evals / "other.jpg").write_bytes(draw_image(99))
    args = ["--input", str(candidates / "candidates-*.parquet"), "--eval_images", str(evals), "--clip_model", "ViT-S-32",
            "--clip_pretrained", "none", "--threshold", "0.999", "--formats", "parquet"]
    single, multi = both_ways(decontaminate.run, args, tmp_path, "decontam")
    # Float noise between 2 threads in one process and 1 in each of two (see the demo test).
    noisy = ("max_eval_similarity", "nearest_eval_id")
    assert rows_of(single, drop=noisy) == rows_of(multi, drop=noisy)
    dropped = [r for r in rejects_of(single) if r[1] == "near_duplicate_of_eval"]
    assert [k for _, _, k in dropped] == [first["key"]]
    assert rejects_of(single) == rejects_of(multi)


def test_refine_multi_process(tmp_path, catalog_path, entity_index):
    from tests.test_refine import write_samples

    cases = {
        "ok": ("Q243", "Eiffel Tower at night"),
        "to_taj": ("Q243", "[[CORRECT_TO:taj  mahal]] white marble mausoleum"),
        "to_mercury": ("Q308", "[[CORRECT_TO:Mercury]] small grey planet"),
        "notentity": ("Q146", "[[NOTENTITY]] blue pattern"),
    }
    inputs = write_samples(tmp_path / "samples.parquet", cases)
    with FakeLLMServer() as server:
        args = ["--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--model", "fake-vlm",
                "--llm_backend", "openai", "--endpoint", server.url, "--formats", "parquet", "--max_concurrency", "2"]
        single, multi = both_ways(refine.run, args, tmp_path, "refine")
    assert rows_of(single) == rows_of(multi)
    assert {json.loads(r)["key"] for r in rows_of(single)} == {"ok", "to_taj", "to_mercury"}
    assert rejects_of(single) == rejects_of(multi)


def test_build_codes_multi_process(tmp_path):
    from tokenizers import BertWordPieceTokenizer

    from pipelines.demo_data.make_corpus import bundled, load_catalog

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator([e["wikipedia_title"].lower() for e in load_catalog()], vocab_size=800, min_frequency=1)
    tok.save_model(str(tmp_path))
    args = ["--entities", bundled("entities.jsonl"), "--tokenizer", str(tmp_path / "vocab.txt")]
    single, multi = both_ways(build_codes.run, args, tmp_path, "codes")
    assert pq.read_table(single / "codes.parquet").to_pylist() == pq.read_table(multi / "codes.parquet").to_pylist()


def test_oven_to_shards_multi_process(tmp_path, catalog_path):
    images = tmp_path / "images"
    (images / "00").mkdir(parents=True)
    for i in range(4):
        (images / "00" / f"oven_{i}.jpg").write_bytes(draw_image(i))
    lines = [{"data_id": f"d{i}", "image_id": f"oven_{i % 5}", "question": "what is this?", "entity_id": "Q243",
              "data_split": "entity_train"} for i in range(6)]
    oven = write_jsonl(tmp_path / "oven.jsonl", lines)
    args = ["--oven", oven, "--images", str(images), "--entities", catalog_path, "--formats", "parquet"]
    single, multi = both_ways(oven_to_shards.run, args, tmp_path, "oven")
    assert rows_of(single) == rows_of(multi)
    assert rejects_of(single) == rejects_of(multi) != []


# --------------------------------------------------------------------------------------
# Dataflow job graphs, built offline
# --------------------------------------------------------------------------------------

GRAPH_LIMIT = 2_000_000  # bytes; Dataflow refuses job graphs above about 10 MB


def many_copies(folder, source, n):
    """n input files (hard links of one), so the graph would grow if it listed them."""
    folder.mkdir()
    for i in range(n):
        os.link(source, folder / f"{i:05d}{os.path.splitext(source)[1]}")
    return folder


def test_dataflow_graphs_are_small_and_do_not_grow_with_inputs(tmp_path, corpus, candidates, entity_index, catalog_path):
    built = {}
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "e.jpg").write_bytes(draw_image(7))
    one_tar = str(corpus / "00000.tar")
    for n in (1, 300):
        tars = many_copies(tmp_path / f"tars{n}", one_tar, n)
        built[("select", n)] = select_candidates.run(
            ["--entity_index", entity_index, "--captions", str(tars), "--caption_format", "webdataset",
             "--output", "gs://entityforge-test-bucket/cands", *DATAFLOW])
        cand = many_copies(tmp_path / f"cands{n}", sorted(glob.glob(str(candidates / "candidates-*.parquet")))[0], n)
        built[("decontaminate", n)] = decontaminate.run(
            ["--input", str(cand), "--eval_images", str(evals), "--clip_model", "ViT-S-32", "--clip_pretrained", "none",
             "--output", "gs://entityforge-test-bucket/shards", *DATAFLOW])
        built[("refine", n)] = refine.run(
            ["--input", str(cand), "--entities", catalog_path, "--entity_index", entity_index, "--model", "m",
             "--llm_backend", "openai", "--endpoint", "http://127.0.0.1:9/v1", "--output", "gs://entityforge-test-bucket/rew", *DATAFLOW])
    built[("build_entity_index", 1)] = build_entity_index.run(
        ["--entities", catalog_path, "--output", "gs://entityforge-test-bucket/index", *DATAFLOW])
    oven = write_jsonl(tmp_path / "oven.jsonl", [{"data_id": "d", "image_id": "i", "entity_id": "Q243", "data_split": "entity_train"}])
    built[("oven_to_shards", 1)] = oven_to_shards.run(
        ["--oven", oven, "--images", "gs://entityforge-test-bucket/images", "--output", "gs://entityforge-test-bucket/oven", *DATAFLOW])
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(["eiffel tower", "mona lisa"], vocab_size=200, min_frequency=1)
    tok.save_model(str(tmp_path))
    built[("build_codes", 1)] = build_codes.run(
        ["--entities", catalog_path, "--tokenizer", str(tmp_path / "vocab.txt"), "--output", str(tmp_path / "codes"), *DATAFLOW])
    for (name, n), summary in built.items():
        assert summary["dry_run"] and summary["runner"] == "DataflowRunner", name
        assert 0 < summary["pipeline_proto_bytes"] < GRAPH_LIMIT, (name, n, summary["pipeline_proto_bytes"])
        # The workers install this package from --setup_file (staged as an sdist).
        staged = [str(dep.role_payload) for env in summary["job"].proto_pipeline.components.environments.values()
                  for dep in env.dependencies]
        assert any("workflow.tar.gz" in s for s in staged), (name, staged)
    for name in ("select", "decontaminate", "refine"):
        grow = built[(name, 300)]["pipeline_proto_bytes"] - built[(name, 1)]["pipeline_proto_bytes"]
        # 300 input files instead of one: the job graph is the same up to a few path bytes.
        assert abs(grow) < 2_000, (name, grow)


def test_worker_images_and_accelerator_flags_reach_the_job(tmp_path, catalog_path, entity_index, candidates):
    """The Dockerfiles copy files that exist and name the interpreter the handler reads; a
    Dataflow job built with the README's GPU flags runs on that image with the accelerator."""
    import re

    from transforms.llm import vllm as llm_vllm

    root = os.path.join(os.path.dirname(__file__), "..")
    for name in ("gpu.Dockerfile", "vllm.Dockerfile"):
        text = open(os.path.join(root, "docker", name), encoding="utf-8").read()
        assert text.count("FROM apache/beam_python3.11_sdk:2.77.0") == 1
        assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
        for line in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
            for path in line.split():
                assert os.path.exists(os.path.join(root, path)), (name, path)
    vllm_text = open(os.path.join(root, "docker", "vllm.Dockerfile"), encoding="utf-8").read()
    assert f"ENV {llm_vllm.VLLM_PYTHON_ENV}=/opt/vllm/bin/python" in vllm_text
    image = "us-central1-docker.pkg.dev/entityforge-test/images/entityforge-gpu:test"
    accelerator = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    summary = decontaminate.run(
        ["--input", str(candidates / "candidates-*.parquet"), "--eval_images", str(candidates), "--clip_model", "ViT-S-32",
         "--clip_pretrained", "none", "--device", "cuda", "--output", "gs://entityforge-test-bucket/shards",
         *DATAFLOW, "--sdk_container_image", image, "--dataflow_service_options", accelerator,
         "--machine_type", "g2-standard-8"])
    job = summary["job"]
    images = {env.payload.decode("latin-1") for env in job.proto_pipeline.components.environments.values()}
    assert any(image in p for p in images), images
    options = job.options.get_all_options()
    assert accelerator in (options.get("dataflow_service_options") or [])
    assert options.get("machine_type") == "g2-standard-8"


def test_demo_chain_multi_process_equals_in_process(tmp_path, demo_run):
    """The demo's chain (index, selection, decontamination, REW) on two SDK worker
    processes writes the rows the in-process run (the session's demo run) writes."""
    from pipelines import demo

    single, a = demo_run
    multi = tmp_path / "multi"
    b = demo.main(["--output", str(multi), "--train_steps", "0", *MULTI])
    assert a["count_check"] == b["count_check"] == "ok"
    assert a["decontaminate"]["count_check"] == b["decontaminate"]["count_check"] == "ok"
    assert a["refine"]["count_check"] == b["refine"]["count_check"] == "ok"
    assert pq.read_table(single / "entity_index" / "entities.parquet").to_pylist() == pq.read_table(
        multi / "entity_index" / "entities.parquet"
    ).to_pylist()
    # `source` is the input file's path, under each run's own output folder. CLIP runs with 2
    # threads in one process and 1 in each of two: similarities agree to float noise, which
    # can flip the 4th decimal or the nearer of two equally near evaluation images.
    noisy = ("source", "max_eval_similarity", "nearest_eval_id")
    for folder, pattern in (("candidates", "candidates-*.parquet"), ("shards", "samples-*.parquet"), ("rew", "samples-*.parquet")):
        left = rows_of(single / folder, pattern, drop=noisy)
        assert left and left == rows_of(multi / folder, pattern, drop=noisy), folder
        assert rejects_of(single / folder) == rejects_of(multi / folder), folder
        sims = [
            {r["key"]: r.get("max_eval_similarity") for r in pq.read_table(glob.glob(str(run / folder / pattern))).to_pylist()}
            for run in (single, multi)
        ]
        assert sims[0].keys() == sims[1].keys()
        for key, s in sims[0].items():
            assert (s is None) == (sims[1][key] is None) and (s is None or abs(s - sims[1][key]) < 1e-4), (folder, key)


def test_ground_multi_process_shares_one_grounder(tmp_path, entity_index):
    """Two SDK processes: grounding is served by one shared Grounder (title tables, index,
    encoder; --share_grounding auto) and answers what the in-process run answers; the job
    also builds for Dataflow."""
    from pipelines import ground

    names = [{"text": t, "id": i} for i, t in enumerate(
        ["eiffel tower", "The Eiffel Tower in Paris", "Jaguar Cars", "Zorblax Quantum Teapot 9000", "Mercury", "mona lisa"] * 4
    )]
    src = write_jsonl(tmp_path / "names.jsonl", names)
    outputs = {}
    for mode, extra in (("single", []), ("multi", MULTI)):
        out = tmp_path / f"{mode}.jsonl"
        counters = ground.run(["--entity_index", entity_index, "--input", src, "--output", str(out), "--min_ground_score", "0.6", *extra])
        assert counters["names_read"] == len(names)
        outputs[mode] = sorted(out.read_text().splitlines())
    assert outputs["single"] == outputs["multi"] and len(outputs["single"]) == len(names)
    built = ground.run(["--entity_index", entity_index, "--input", src, "--output", "gs://entityforge-test-bucket/g.jsonl", *DATAFLOW])
    assert built["dry_run"] and 0 < built["pipeline_proto_bytes"] < GRAPH_LIMIT
