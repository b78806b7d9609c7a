"""A key planted in every channel a user can pass one through (the key's environment
variable, user info and query string of --endpoint, a vLLM server argument) and one a
server echoes back in its error text appears in no file the run writes and in no log
line."""

import logging
import os

import pytest

from pipelines import refine
from tests.fake_llm_server import FakeLLMServer
from tests.test_refine import CASES, write_samples
from transforms.run.secrets import redact, redact_url, redact_value

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

ENV_KEY = "sk-plantedENVKEY0123456789"
URL_PASSWORD = "plantedURLpass123"
URL_QUERY_KEY = "plantedQUERYkey456"
VLLM_KEY = "plantedVLLMkey789"
PLANTED = (ENV_KEY, URL_PASSWORD, URL_QUERY_KEY, VLLM_KEY)


def test_no_planted_key_in_any_output_or_log(tmp_path, catalog_path, entity_index, monkeypatch, caplog):
    monkeypatch.setenv("PLANTED_KEY", ENV_KEY)
    cases = {k: CASES[k] for k in ("ok", "to_taj", "r500")}
    cases["echo"] = ("Q243", "[[ECHO_AUTH]] the tower")
    inputs = write_samples(tmp_path / "samples.parquet", cases)
    out, cache = tmp_path / "rew", tmp_path / "cache"
    caplog.set_level(logging.INFO)
    from transforms.run.secrets import install_log_redaction

    install_log_redaction()
    for handler in logging.getLogger().handlers:  # pytest's capture handler included
        from transforms.run.secrets import RedactingFilter

        handler.addFilter(RedactingFilter())
    with FakeLLMServer() as server:
        host = server.url.split("://", 1)[1]
        endpoint = f"http://user:{URL_PASSWORD}@{host}?api_key={URL_QUERY_KEY}"
        summary = refine.run([
            "--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(out),
            "--model", "fake-vlm", "--cache", str(cache), "--formats", "parquet,webdataset",
            "--llm_backend", "openai", "--endpoint", endpoint, "--api_key_env", "PLANTED_KEY",
            "--vllm_server_arg", f"api-key={VLLM_KEY}", "--vllm_server_arg", "max-model-len=4096",
            "--max_retries", "1", "--retry_backoff", "0.01",
        ])
        auths = [r["auth"] for r in server.requests]
    # The key did reach the server (the channel works) ...
    assert any(a and ENV_KEY in a for a in auths)
    assert summary["counters"]["rejected_verify_endpoint_error"] == 1  # the echoing server's 401
    # ... and nothing the run wrote or logged holds any planted secret.
    leaks = []
    for root, _, files in os.walk(tmp_path):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            leaks += [(name, s) for s in PLANTED if s.encode() in data]
    leaks += [("log", s) for s in PLANTED for r in caplog.records if s in r.getMessage()]
    assert not leaks, leaks
    # The manifest still says where the run went, minus the credentials.
    opts = summary["options"]
    assert opts["endpoint"] == server.url.rstrip("/") or opts["endpoint"].startswith("http://127.0.0.1")
    assert "max-model-len=4096" in opts["vllm_server_arg"] and "api-key=[redacted]" in opts["vllm_server_arg"]


def test_redaction_keeps_data_readable():
    assert redact_url("https://u:p@h.example:8443/v1/x?key=1#f") == "https://h.example:8443/v1/x"
    assert redact_url("https://h/img.jpg?w=200&api_key=zz", strip_query=False) == "https://h/img.jpg?w=200&api_key=zz"
    assert redact("https://h/img.jpg?w=200&api_key=zz12345", strip_query=False) == "https://h/img.jpg?w=200&api_key=[redacted]"
    record = '{"key": "run1/000123", "caption": "a key to the city; a token of love", "url": "http://x/a.jpg?w=1"}'
    assert redact(record, strip_query=False) == record
    assert redact_value({"key": "k1", "api_key": "abc12345", "endpoint": "http://a:b@h/v1"}) == {
        "key": "k1", "api_key": "[redacted]", "endpoint": "http://h/v1"}


SECRET_KEY = "sk-plantedSECRETMANAGERkey42"


def test_key_from_secret_manager_reaches_the_server_and_nothing_else(tmp_path, catalog_path, entity_index, monkeypatch):
    """--api_key_secret: read on the worker through the Secret Manager API (a loopback
    fake, which fails the first call with 503: retried), sent as the bearer token, and in
    no file the run writes. A secret the workers may not read fails the job with a message
    that says what to grant."""
    from tests.fake_secret_manager import FakeSecretManager

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    inputs = write_samples(tmp_path / "samples.parquet", {k: CASES[k] for k in ("ok", "to_taj")})
    out = tmp_path / "rew"
    name = "projects/demo/secrets/llm-key/versions/3"
    with FakeSecretManager({name: SECRET_KEY}, denied={"projects/demo/secrets/other/versions/latest"}, fail_first=1) as sm, \
            FakeLLMServer() as server:
        base = ["--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--model", "fake-vlm",
                "--formats", "parquet", "--llm_backend", "openai", "--endpoint", server.url, "--secret_manager_endpoint", sm.url]
        summary = refine.run(base + ["--output", str(out), "--cache", str(tmp_path / "cache"), "--api_key_secret", name])
        auths = {r["auth"] for r in server.requests}
        assert summary["count_check"] == "ok" and auths == {f"Bearer {SECRET_KEY}"}
        assert sm.calls.count(f"/v1/{name}:access") >= 2  # the 503, then the answer
        leaks = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs
                 if SECRET_KEY.encode() in open(os.path.join(r, f), "rb").read()]
        assert not leaks, leaks
        import pytest

        with pytest.raises(Exception, match="secretmanager.secretAccessor"):
            refine.run(base + ["--output", str(tmp_path / "denied"), "--api_key_secret", "projects/demo/secrets/other"])


def test_api_key_secret_names_are_checked_before_the_run(tmp_path, catalog_path, entity_index):
    import pytest

    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--api_key_secret"):
        refine.run(["--input", catalog_path, "--entities", catalog_path, "--entity_index", entity_index, "--output",
                    str(tmp_path / "o"), "--model", "m", "--llm_backend", "openai", "--endpoint", "http://127.0.0.1:9",
                    "--api_key_secret", "my-key"])


VLLM_SERVER_KEY = "PLANTEDvllmSERVERkey0461"
OPENAI_ENV_KEY = "PLANTED2openaiENVkey0462"


def test_vllm_server_key_reaches_the_server_and_nothing_else(tmp_path, catalog_path, entity_index, monkeypatch, caplog, capfd):
    """`--llm_backend vllm --vllm_server_arg api-key=K`, with OPENAI_API_KEY set too: the server
    (the stand-in of tests/test_vllm_backend.py) gets K only as VLLM_API_KEY and nothing of
    OPENAI_API_KEY; our client authenticates with K (the stand-in refuses anything else); K
    and the OpenAI key are in no log line (unfiltered records and the processes' output),
    not on the server's command line (what `ps` shows), and in no file the run writes."""
    from tests.test_vllm_backend import FakeVLLM, proc_view, vllm_server_pids
    from transforms.llm import vllm as llm_vllm

    fake = FakeVLLM(str(tmp_path / "fake_vllm"))
    monkeypatch.setenv(llm_vllm.VLLM_PYTHON_ENV, fake.python)
    monkeypatch.setenv(llm_vllm.REGISTRY_ENV, str(tmp_path / "registry"))
    monkeypatch.setattr(llm_vllm, "REGISTRY_ROOT", None)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_ENV_KEY)
    model = f"fake-vlm-{os.getpid()}"
    seen = []
    real_shutdown = llm_vllm.shutdown_vllm_servers

    def look_then_shutdown(*a, **k):  # the servers' view while they still run
        seen.extend((pid, *proc_view(pid)) for pid in vllm_server_pids(model))
        return real_shutdown(*a, **k)

    monkeypatch.setattr(llm_vllm, "shutdown_vllm_servers", look_then_shutdown)
    caplog.set_level(logging.INFO)
    inputs = write_samples(tmp_path / "samples.parquet", {k: CASES[k] for k in ("ok", "to_taj", "notentity")})
    out = tmp_path / "rew"
    summary = refine.run([
        "--input", inputs, "--entities", catalog_path, "--entity_index", entity_index, "--output", str(out),
        "--model", model, "--cache", str(tmp_path / "cache"), "--formats", "parquet,webdataset",
        "--llm_backend", "vllm", "--vllm_server_arg", f"api-key={VLLM_SERVER_KEY}", "--vllm_server_arg", "max-model-len=4096",
    ])
    assert summary["count_check"] == "ok", summary["count_check"]
    sent = fake.requests()
    assert sent and all(r["auth_ok"] and r["status"] == 200 for r in sent), sent
    assert not {k for k in summary["counters"] if "endpoint" in k}, summary["counters"]
    # The server: the key in its environment only, as VLLM_API_KEY; no OpenAI key; stopped.
    assert seen  # one server per stage that asks the model (verify, rationale)
    for _pid, cmdline, environ in seen:
        assert environ.get("VLLM_API_KEY") == VLLM_SERVER_KEY
        assert "OPENAI_API_KEY" not in environ
        assert not [v for k, v in environ.items() if k != "VLLM_API_KEY" and (VLLM_SERVER_KEY in v or OPENAI_ENV_KEY in v)]
        assert "vllm.entrypoints.openai.api_server" in cmdline and "--max-model-len" in cmdline
        assert not [a for a in cmdline if VLLM_SERVER_KEY in a or OPENAI_ENV_KEY in a], cmdline
    assert vllm_server_pids(model) == []
    # Nothing written, logged or printed holds either key.
    planted = (VLLM_SERVER_KEY, OPENAI_ENV_KEY)
    leaks = [(os.path.join(r, f), s) for r, _, fs in os.walk(tmp_path) for f in fs for s in planted
             if s.encode() in open(os.path.join(r, f), "rb").read()]
    output = capfd.readouterr()
    leaks += [("log", s) for s in planted for r in caplog.records if s in r.getMessage()]
    leaks += [(name, s) for s in planted for name, text in (("stdout", output.out), ("stderr", output.err)) if s in text]
    assert not leaks, leaks
    assert "api-key=[redacted]" in summary["options"]["vllm_server_arg"]
    assert any("starting vllm server" in r.getMessage() for r in caplog.records) or "starting vllm server" in output.err


def test_redaction_of_the_shapes_a_server_command_is_logged_in():
    """Lists, tuples, dicts and quoted command lines: the value after a secret name goes,
    whole, and what is around it stays."""
    v = "plantedSHAPEkey0470"
    cases = {
        f"['--api-key', '{v}', '--port', '8000']": "['--api-key', '[redacted]', '--port', '8000']",
        f"Starting service with ['python' '-m' 'vllm' '--api-key' '{v}' '--port' '8000']":
            "Starting service with ['python' '-m' 'vllm' '--api-key' '[redacted]' '--port' '8000']",
        f'"--api-key" "{v}"': '"--api-key" "[redacted]"',
        f"--api-key={v} --port 1": "--api-key=[redacted] --port 1",
        f"--api-key {v} --port 1": "--api-key [redacted] --port 1",
        f"--api-key '{v} with space'": "--api-key '[redacted]'",
        f"('api-key', '{v}')": "('api-key', '[redacted]')",
        f"{{'api-key': '{v}', 'max-model-len': '4096'}}": "{'api-key': '[redacted]', 'max-model-len': '4096'}",
        f'{{"hf_token": "{v}"}}': '{"hf_token": "[redacted]"}',
        f'api_key="{v} x"': 'api_key="[redacted]"',
        f"[('api-key', '{v}'), ('tokenizer', 'gpt2')]": "[('api-key', '[redacted]'), ('tokenizer', 'gpt2')]",
    }
    for text, want in cases.items():
        assert redact(text) == want, text
    # Data that merely mentions such words keeps its text.
    for text in ("a key to the city; a token of love", "['tokenizer', 'gpt2']", "{'max-num-batched-tokens': '8192'}"):
        assert redact(text) == text


def test_redaction_costs_linear_time_on_hostile_text():
    import time

    for text in ("a-" * 200_000, "--api-key '" * 50_000, "'token' '" + "x" * 300_000, "api_key='" * 50_000):
        started = time.monotonic()
        redact(text)
        assert time.monotonic() - started < 5.0, text[:20]


def test_vllm_server_arguments_are_registered_as_secrets_when_parsed(tmp_path):
    """The parsed --vllm_server_arg secret is redacted wherever it appears from then on, even
    with nothing naming it; one vLLM could only read from its command line is refused."""
    import pytest

    from transforms.errors import UsageError

    key = "plantedPARSEDkey0480"
    base = ["--input", "x", "--entities", "e", "--entity_index", "i", "--output", str(tmp_path / "o"),
            "--llm_backend", "vllm", "--model", "m", "--cache", str(tmp_path / "c")]
    handler = refine.llm_handler(refine.build_parser().parse_args(base + ["--vllm_server_arg", f"api-key={key}"]))
    assert handler._api_key == key
    assert redact(f"unrelated text {key} here") == "unrelated text [redacted] here"
    with pytest.raises(UsageError, match="ssl-keyfile-password"):
        refine.llm_handler(refine.build_parser().parse_args(base + ["--vllm_server_arg", "ssl-keyfile-password=pw0481xx"]))
