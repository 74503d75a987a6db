"""An in-process stand-in for the slice of the Kubernetes API that
KubernetesExecutor uses: batch/v1 Jobs (create, read, watch, delete), core/v1
Services (create), pods (list) and pod logs; and the slice TgiRollout uses:
apps/v1 Deployments (read, strategic-merge patch of container args).

No API server can run on this machine, so the executor's calls through the
real `kubernetes` client are checked against this: request paths, query
parameters, bodies, error statuses and the watch stream's wire format. It
keeps objects in memory and changes a Job's status only when a test says so.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

JOBS = re.compile(r"/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
SERVICES = re.compile(r"/api/v1/namespaces/([^/]+)/services(?:/([^/]+))?$")
PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
DEPLOYMENTS = re.compile(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class JobsApi:
    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.deployments: dict[str, dict] = {}
        self.patches: list[tuple[str, str, dict]] = []  # (name, content type, body)
        self.pods: list[dict] = []
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.on_watch = None  # called with the job name when a watch opens
        self._version = 0
        self._changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> JobsApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def set_status(self, name: str, status: dict) -> None:
        with self._changed:
            job = self.jobs[name]
            job["status"] = status
            self._touch(job)
            self._changed.notify_all()

    def _touch(self, obj: dict) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the watch streams in chunks, as the API server does

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _route(self, method: str):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((method, url.path, query))
                return url.path, query

            def do_POST(self):
                path, _ = self._route("POST")
                body = self._body()
                store = api.jobs if JOBS.match(path) else api.services if SERVICES.match(path) else None
                if store is None:
                    return self._send(404, _status(404, "NotFound", path))
                name = body["metadata"]["name"]
                with api._changed:
                    if name in store:
                        return self._send(409, _status(409, "AlreadyExists", f'"{name}" already exists'))
                    body["metadata"]["uid"] = str(uuid.uuid4())
                    api._touch(body)
                    store[name] = body
                self._send(201, body)

            def do_GET(self):
                path, query = self._route("GET")
                if m := JOBS.match(path):
                    if m.group(2):
                        job = api.jobs.get(m.group(2))
                        return self._send(200, job) if job else self._send(404, _status(404, "NotFound", m.group(2)))
                    if query.get("watch") in ("true", "True", "1"):
                        return self._watch(query)
                if PODS.match(path):
                    key, _, value = query.get("labelSelector", "").partition("=")
                    items = [p for p in api.pods if p["metadata"]["labels"].get(key) == value]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if m := LOG.match(path):
                    return self._send(200, api.logs.get(m.group(2), ""))
                if m := DEPLOYMENTS.match(path):
                    deployment = api.deployments.get(m.group(2))
                    return (
                        self._send(200, deployment)
                        if deployment
                        else self._send(404, _status(404, "NotFound", m.group(2)))
                    )
                self._send(404, _status(404, "NotFound", path))

            def do_PATCH(self):
                path, _ = self._route("PATCH")
                body, kind = self._body(), self.headers.get("Content-Type", "")
                m = DEPLOYMENTS.match(path)
                if not m or m.group(2) not in api.deployments:
                    return self._send(404, _status(404, "NotFound", path))
                if kind != "application/strategic-merge-patch+json":
                    return self._send(415, _status(415, "UnsupportedMediaType", kind))
                api.patches.append((m.group(2), kind, body))
                deployment = api.deployments[m.group(2)]
                # Strategic merge, as far as container args go: containers merge by name, args are replaced.
                containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
                for change in body.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                    containers[change["name"]].update(change)
                api._touch(deployment)
                self._send(200, deployment)

            def _watch(self, query: dict) -> None:
                name = query["fieldSelector"].removeprefix("metadata.name=")
                timeout = float(query.get("timeoutSeconds", 5))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def emit(kind: str, obj: dict) -> None:
                    line = (json.dumps({"type": kind, "object": obj}) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()

                with api._changed:
                    job = api.jobs.get(name)
                    seen = job["metadata"]["resourceVersion"] if job else None
                    if job:
                        emit("ADDED", job)
                if api.on_watch:
                    api.on_watch(name)
                with api._changed:
                    while True:
                        job = api.jobs.get(name)
                        current = job["metadata"]["resourceVersion"] if job else None
                        if current != seen:
                            emit("MODIFIED" if job else "DELETED", job or {"metadata": {"name": name}})
                            seen = current
                        if not api._changed.wait(timeout):
                            break
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def do_DELETE(self):
                path, _ = self._route("DELETE")
                self._body()  # the client may send DeleteOptions; read them off the wire
                for pattern, store in ((JOBS, api.jobs), (SERVICES, api.services)):
                    if (m := pattern.match(path)) and m.group(2):
                        with api._changed:
                            obj = store.pop(m.group(2), None)
                            api._changed.notify_all()
                        if obj is None:
                            return self._send(404, _status(404, "NotFound", m.group(2)))
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                self._send(404, _status(404, "NotFound", path))

        return Handler
