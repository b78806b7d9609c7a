"""A loopback Secret Manager: the REST `versions:access` call the google-cloud-secret-manager
client makes (`GET /v1/projects/P/secrets/S/versions/V:access`), answering from a dict;
unknown names get 404, names in `denied` 403, and the first `fail_first` calls 503."""

from __future__ import annotations

import base64
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeSecretManager:
    def __init__(self, secrets: dict[str, str], denied=(), fail_first: int = 0):
        self.secrets = dict(secrets)
        self.denied = set(denied)
        self.fail_first = fail_first
        self.calls: list[str] = []

    def __enter__(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                outer.calls.append(path)
                if not path.startswith("/v1/") or not path.endswith(":access"):
                    return self._json(404, {"error": {"code": 404, "message": "no such method", "status": "NOT_FOUND"}})
                name = path[len("/v1/"): -len(":access")]
                if len(outer.calls) <= outer.fail_first:
                    return self._json(503, {"error": {"code": 503, "message": "try again", "status": "UNAVAILABLE"}})
                if name in outer.denied:
                    return self._json(403, {"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}})
                if name not in outer.secrets:
                    return self._json(404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}})
                data = outer.secrets[name].encode()
                return self._json(200, {"name": name, "payload": {
                    "data": base64.b64encode(data).decode(), "dataCrc32c": str(zlib.crc32(data))}})

            def _json(self, status, body):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
