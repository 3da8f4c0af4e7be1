"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1 for the download tests.

It serves /api/models/{repo}/revision/{rev} (what huggingface_hub's model_info asks) and
/{repo}/resolve/{rev}/{file} with HTTP ranges, and can misbehave on request: cut a transfer halfway,
serve wrong bytes, list hostile file names, or answer 401/404.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class HubState:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> {filename: bytes}
    cut_once: set[str] = field(default_factory=set)  # files whose next transfer stops halfway
    corrupt: set[str] = field(default_factory=set)  # files served with wrong bytes (the listing keeps the true sha)
    extra_listing: dict[str, list[str]] = field(default_factory=dict)  # repo -> hostile names to list
    unauthorized: set[str] = field(default_factory=set)  # repos answering 401
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_directory(self, repo: str, directory: Path) -> None:
        self.repos[repo] = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if status == 404:
            headers["X-Error-Code"] = "RepoNotFound"
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        with self.state.lock:
            self.state.requests.append((path, self.headers.get("Range", "")))
        if path.startswith("/api/models/"):
            repo, _, revision = path[len("/api/models/") :].partition("/revision/")
            return self._listing(repo, revision)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), "/".join(parts[4:]))
        self._error(404, "not found")

    def _listing(self, repo: str, revision: str) -> None:
        if repo in self.state.unauthorized:
            return self._error(401, "Invalid credentials")
        files = self.state.repos.get(repo)
        if files is None:
            return self._error(404, "Repository not found")
        siblings = [
            {
                "rfilename": name,
                "size": len(data),
                "blobId": hashlib.sha1(data).hexdigest(),
                "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                if name.endswith(".safetensors")
                else None,
            }
            for name, data in files.items()
        ]
        siblings += [{"rfilename": name, "size": 1} for name in self.state.extra_listing.get(repo, [])]
        body = {"id": repo, "modelId": repo, "sha": "0" * 40, "private": False, "siblings": siblings}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _file(self, repo: str, name: str) -> None:
        if repo in self.state.unauthorized:
            return self._error(401, "Invalid credentials")
        data = self.state.repos.get(repo, {}).get(name)
        if data is None:
            return self._error(404, "Entry not found")
        if name in self.state.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes="):
            start = int(range_header[len("bytes=") :].split("-")[0] or 0)
        body = data[start:]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": "0" * 40, "Accept-Ranges": "bytes"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        with self.state.lock:
            cut = name in self.state.cut_once
            self.state.cut_once.discard(name)
        if cut:  # promise the whole body, deliver half, hang up
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers)


class HubServer:
    """Start with `with HubServer(state) as server:`; `server.url` is the HF_ENDPOINT to use."""

    def __init__(self, state: HubState) -> None:
        handler = type("Handler", (_Handler,), {"state": state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
