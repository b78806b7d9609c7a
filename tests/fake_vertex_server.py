"""A loopback fake of Vertex AI's batchPredictionJobs REST API for Gemini, reading its input
and writing its predictions through Beam's FileSystems (pointed at the GCS emulator in
tests). It answers like tests/fake_llm_server.py's model, and scripts the faults of a real
job by markers in the caption: [[BATCHFAIL]] (an error status the first time the line is in
a job), [[BATCHDEAD]] (always), [[BATCHLOST]] (missing from the output the first time);
jobs whose number (1-based) is in `expire_jobs` expire with only the first half of their
lines answered. Every line answered is counted per request key (`answered`), so a test
can check that nothing was paid twice."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from urllib.parse import unquote

from aiohttp import web

from tests.fake_llm_server import FakeLLMServer, _between


class FakeVertexServer:
    def __init__(self, polls: int = 1):
        self.polls = polls  # GETs a job stays running
        self.expire_jobs: set[int] = set()
        self.jobs: dict[str, dict] = {}
        self.created = 0
        self.lines_seen = Counter()  # key label -> times it was in a job
        self.answered = Counter()  # key label -> answers written
        self.model = FakeLLMServer()  # only its answers; never started

    def __enter__(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        base = "/v1/projects/{project}/locations/{location}/batchPredictionJobs"
        app.router.add_post(base, self._create)
        app.router.add_get(base, self._list)
        app.router.add_get(base + "/{job}", self._get)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        started.set()
        self._loop.run_forever()

    async def _create(self, request):
        body = await request.json()
        self.created += 1
        p, loc = request.match_info["project"], request.match_info["location"]
        name = f"projects/{p}/locations/{loc}/batchPredictionJobs/{1000 + self.created}"
        self.jobs[name] = {"name": name, "n": self.created, "displayName": body["displayName"], "model": body["model"],
                           "input": body["inputConfig"]["gcsSource"]["uris"][0],
                           "output": body["outputConfig"]["gcsDestination"]["outputUriPrefix"], "state": "JOB_STATE_QUEUED",
                           "gets": 0}
        return web.json_response(self._public(self.jobs[name]))

    async def _list(self, request):
        flt = unquote(request.query.get("filter", ""))
        want = flt.split('"')[1] if flt.startswith("display_name=") else None
        found = [self._public(j) for j in self.jobs.values() if want is None or j["displayName"] == want]
        return web.json_response({"batchPredictionJobs": found})

    async def _get(self, request):
        p, loc = request.match_info["project"], request.match_info["location"]
        name = f"projects/{p}/locations/{loc}/batchPredictionJobs/{request.match_info['job']}"
        job = self.jobs.get(name)
        if job is None:
            return web.json_response({"error": {"code": 404, "message": "not found"}}, status=404)
        job["gets"] += 1
        if job["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING"):
            job["state"] = "JOB_STATE_RUNNING"
            if job["gets"] > self.polls:
                await asyncio.get_running_loop().run_in_executor(None, self._run, job)
        return web.json_response(self._public(job))

    def _public(self, job):
        out = {k: job[k] for k in ("name", "displayName", "model", "state")}
        if "output_dir" in job:
            out["outputInfo"] = {"gcsOutputDirectory": job["output_dir"]}
        return out

    def _run(self, job):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(job["input"]) as f:
            lines = [json.loads(x) for x in f.read().decode("utf-8").splitlines() if x.strip()]
        expire = job["n"] in self.expire_jobs
        out = []
        for i, line in enumerate(lines):
            req = line["request"]
            label = req["labels"]["entityforge_key"]
            self.lines_seen[label] += 1
            first = self.lines_seen[label] == 1
            if expire and i >= len(lines) // 2:
                continue
            text = "".join(p.get("text", "") for c in req["contents"] if c["role"] == "user" for p in c["parts"])
            caption = _between(text, "<<<CAPTION", "CAPTION>>>")
            if "[[BATCHLOST]]" in caption and first:
                continue
            if "[[BATCHDEAD]]" in caption or ("[[BATCHFAIL]]" in caption and first):
                out.append({"request": req, "status": "Internal error encountered.", "response": None})
                continue
            assert req["generationConfig"]["responseMimeType"] == "application/json"
            assert any("inlineData" in p for p in req["contents"][0]["parts"]), "the image travels inline"
            content = self.model._answer(text, caption, len(req["contents"]))
            self.answered[label] += 1
            out.append({"request": req, "status": "", "response": {
                "candidates": [{"content": {"role": "model", "parts": [{"text": content}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": len(text) // 4 + 258, "candidatesTokenCount": len(content) // 4,
                                  "totalTokenCount": 0},
                "modelVersion": job["model"].rsplit("/", 1)[-1]}})
        job["output_dir"] = f"{job['output'].rstrip('/')}/prediction-model-{job['n']}"
        with FileSystems.create(f"{job['output_dir']}/predictions.jsonl") as f:
            f.write("".join(json.dumps(o) + "\n" for o in out).encode("utf-8"))
        job["state"] = "JOB_STATE_EXPIRED" if expire else "JOB_STATE_SUCCEEDED"
