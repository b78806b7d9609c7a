"""A fault proxy in front of the GCS emulator, on 127.0.0.1: it answers a seeded share of
requests with 429 or 503 (before they reach the emulator, as a throttling front end
does) and cuts a share of object downloads short (the headers promise the whole object,
the connection closes half-way). Point STORAGE_EMULATOR_HOST at it.

    proxy = FaultProxy("http://127.0.0.1:9023", error_share=0.08, cut_share=0.2, seed=0)
    proxy.start(); ...; proxy.stop(); proxy.counts  # {"429": n, "503": n, "cut": n, "passed": n}
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
import urllib.parse
from collections import Counter

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, error_share: float = 0.08, cut_share: float = 0.2, seed: int = 0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.error_share, self.cut_share = error_share, cut_share
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self, download: bool) -> str:
        with self.lock:
            x = self.rng.random()
            if x < self.error_share:
                kind = "429" if self.rng.random() < 0.5 else "503"
            elif download and x < self.error_share + self.cut_share:
                kind = "cut"
            else:
                kind = "passed"
            if kind != "cut":  # counted when a download is really cut (a 200 or 206 with a body)
                self.counts[kind] += 1
            return kind

    def _count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _any(self):
                body = self._body()
                download = self.command == "GET" and "alt=media" in self.path
                kind = proxy._draw(download)
                if kind in ("429", "503"):
                    payload = b'{"error": {"code": %s, "message": "injected by the fault proxy"}}' % kind.encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if body or self.command in ("POST", "PUT", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if kind == "cut" and resp.status in (200, 206) and len(data) > 1:
                    proxy._count("cut")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if kind == "cut":
                    proxy._count("passed")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any  # noqa: N815 - http.server's names

        return Handler
