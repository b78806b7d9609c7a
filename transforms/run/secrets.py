"""Keeping credentials out of everything a run writes.

Keys come from the environment (`--api_key_env`) and are only ever put in request
headers. Everything that leaves a process as text (the manifest's options, reject
details and records, log lines) goes through `redact`: URLs lose their user info, query
string and fragment (`https://user:pw@host/v1?key=K` -> `https://host/v1`), `key=value`
pairs and `Bearer` tokens whose name says secret lose their value, and any secret value
this process has seen (`register_secret`) is replaced wherever it appears.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "[redacted]"

_KNOWN: set[str] = set()
_LOCK = threading.Lock()

# (A scheme is short: bounding it keeps a long run of `a-a-a-...` linear, not quadratic.)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{0,31}://[^\s\"'<>]+")
# Names that say "secret" (a bare `key` does not: it is the image key of every record).
_SECRET_NAME = r"(?:api[-_]?key|apikey|access[-_]?key|secret[-_]?key|access[-_]?token|auth[-_]?token|token|secret|password|passwd|credentials?|authorization)"
# name=value, name: value, "name": "value" (JSON), --name=value, and --name value (CLI)
_PAIR = re.compile(
    rf"(?i)(?P<name>(?<![a-z0-9])[\"']?-{{0,2}}(?:[a-z0-9]+[-_])?{_SECRET_NAME}[\"']?\s*(?:=|:)\s*[\"']?)(?P<value>[^\s\"',;&]+)"
)
_CLI_PAIR = re.compile(rf"(?i)(?P<name>--(?:[a-z0-9]+[-_])?{_SECRET_NAME}\s+)(?P<value>[^\s\"',;&-][^\s\"',;&]*)")
# A quoted value after a secret name, whole (spaces included), in the shapes a command line
# or a settings dict takes when printed: ['--api-key', 'V'] and Beam's ['--api-key' 'V'],
# ('api-key', 'V'), {'api-key': 'V'}, "--api-key" "V", --api-key 'V' (shlex), api_key="V".
# Prefix segments and the value are bounded, so hostile text costs linear time.
_NAME_WORDS = rf"(?:[a-z0-9]{{1,64}}[-_]){{0,3}}{_SECRET_NAME}"
_QUOTED_PAIR = re.compile(
    rf"(?i)(?P<name>(?<![a-z0-9])(?:"
    rf"(?P<nq>[\"'])-{{0,2}}{_NAME_WORDS}(?P=nq)\s*[=:,]?\s*"  # 'api-key', 'V' / "--api-key" "V"
    rf"|--{_NAME_WORDS}(?:\s*=\s*|\s+)"  # --api-key 'V' / --api-key="V"
    rf"|{_NAME_WORDS}\s*[=:]\s*"  # api_key="V"
    rf"))(?P<q>[\"'])(?P<value>(?:(?!(?P=q))[^\n]){{1,1024}})(?P=q)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# Shapes of common provider keys, redacted even when nothing names them.
_KEY_SHAPES = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{12,}|AIza[0-9A-Za-z_-]{30,}|hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,})")


def is_secret_name(name: str) -> bool:
    """Whether a setting or variable name says it holds a secret: `api-key`, `hf_token`,
    `OPENAI_API_KEY`, `--db-password` (but not `key`, `tokenizer` or `max-num-batched-tokens`)."""
    return bool(re.fullmatch(rf"(?i)-{{0,2}}{_NAME_WORDS}", (name or "").strip()))


def register_secret(value: str | None) -> None:
    """Remember a secret value (an API key read from the environment) so that `redact`
    removes it from any text, whatever surrounds it."""
    if value and len(value) >= 6:
        with _LOCK:
            _KNOWN.add(value)


def redact_url(url: str, strip_query: bool = True) -> str:
    """`scheme://host[:port]/path` without user info, and without query string and
    fragment unless `strip_query` is False (then only secret-named parameters lose their
    values, see `redact`)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    if port:
        host = f"{host}:{port}"
    if strip_query:
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(text: str, strip_query: bool = True) -> str:
    """`text` with URLs cleaned (`redact_url`), secret-named values, bearer tokens,
    key-shaped strings and every registered secret replaced by [redacted].

    `strip_query=False` keeps URL query strings (minus secret-named parameters): for
    records that are data, such as a rejected corpus row's image URL."""
    if not text:
        return text
    with _LOCK:
        known = sorted(_KNOWN, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _URL.sub(lambda m: redact_url(m.group(0), strip_query), text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _KEY_SHAPES.sub(REDACTED, text)
    text = _QUOTED_PAIR.sub(lambda m: m.group("name") + m.group("q") + REDACTED + m.group("q"), text)
    text = _CLI_PAIR.sub(lambda m: m.group("name") + REDACTED, text)
    return _PAIR.sub(lambda m: m.group("name") + REDACTED, text)


def redact_value(value: Any) -> Any:
    """Strings redacted, lists / tuples / dicts walked (dict entries whose key names a
    secret are dropped to [redacted]); anything else as is."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and re.fullmatch(rf"(?i)(?:[a-z0-9]+[-_])?{_SECRET_NAME}", k) and v else redact_value(v))
            for k, v in value.items()
        }
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is not ours to fix here
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Redact every log line of this process (root handlers)."""
    root = logging.getLogger()
    for handler in root.handlers or []:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class SecretAccessError(RuntimeError):
    """A secret that does not exist or may not be read: retrying does not help."""


SECRET_NAME = re.compile(r"^projects/[^/\s]+/secrets/[^/\s]+(?:/versions/[^/\s]+)?$")


def secret_version_name(name: str) -> str:
    """A Secret Manager reference as a version name (`.../versions/latest` when none is
    given); ValueError for anything else."""
    name = (name or "").strip()
    if not SECRET_NAME.match(name):
        raise ValueError(f"{name!r} is not a Secret Manager name: expected projects/P/secrets/S[/versions/V]")
    return name if "/versions/" in name else f"{name}/versions/latest"


def read_secret(name: str, endpoint: str | None = None) -> str:
    """The payload of a Secret Manager secret version, read where it is called: on the
    worker, with the worker's service account (Dataflow workers do not inherit the
    launcher's environment). Registered for redaction before it is returned.

    `endpoint`: another Secret Manager API root (a private service connect endpoint, a
    regional endpoint, or a local fake `http://127.0.0.1:PORT` reached without credentials).
    Unavailable / deadline errors are retried; a missing secret or a denied permission is
    raised at once, naming the secret and what to grant.
    """
    from google.api_core import exceptions as gexc
    from google.api_core import retry as gretry
    from google.api_core.client_options import ClientOptions
    from google.cloud import secretmanager

    version = secret_version_name(name)
    kwargs: dict[str, Any] = {"transport": "rest"}
    if endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=endpoint)
        if endpoint.startswith("http://"):
            from google.auth.credentials import AnonymousCredentials

            kwargs["credentials"] = AnonymousCredentials()
    client = secretmanager.SecretManagerServiceClient(**kwargs)
    transient = gretry.if_exception_type(
        gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.TooManyRequests,
        gexc.BadGateway, ConnectionError, TimeoutError,
    )
    try:
        response = client.access_secret_version(
            name=version, retry=gretry.Retry(predicate=transient, initial=0.5, maximum=10.0, multiplier=2.0, timeout=120.0)
        )
    except (gexc.NotFound, gexc.PermissionDenied, gexc.Unauthenticated, gexc.Forbidden) as e:
        raise SecretAccessError(
            f"cannot read secret {version}: {type(e).__name__}. Check the name, and grant the workers' "
            f"service account roles/secretmanager.secretAccessor on it"
        ) from None
    value = response.payload.data.decode("utf-8").strip()
    register_secret(value)
    return value
