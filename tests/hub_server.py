"""A local stand-in for the Hub endpoints ``create_repo`` + ``upload_folder`` call, recording what it receives."""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Recorded:
    """Everything the fake Hub was sent."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)
    created: list[dict[str, Any]] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"repo", "revision", "header", "files"}


class _Handler(BaseHTTPRequestHandler):
    recorded: Recorded

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        return

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.recorded.requests.append(("POST", self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.recorded.created.append(payload)
            repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._reply(200, {"files": modes})
        if match := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            self.recorded.commits.append(
                {"repo": match.group(1), "revision": match.group(2), "header": header, "files": files}
            )
            url = f"http://{self.headers['Host']}/{match.group(1)}/commit/{SHA}"
            return self._reply(200, {"commitUrl": url, "commitOid": SHA, "success": True})
        return self._reply(404, {"error": f"fake Hub does not serve POST {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self.recorded.requests.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.split("?")[0] == "/api/whoami-v2":
            return self._reply(200, {"type": "user", "name": "someone", "auth": {"type": "access_token"}})
        self._reply(404, {"error": f"fake Hub does not serve GET {self.path}"})


class FakeHub:
    """``with FakeHub() as hub:`` serves on ``hub.endpoint`` (127.0.0.1, a free port) and records into ``hub.recorded``."""

    def __init__(self) -> None:
        self.recorded = Recorded()
        handler = type("Handler", (_Handler,), {"recorded": self.recorded})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
