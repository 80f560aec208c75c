"""A loopback stand-in for the Hugging Face Hub's HTTP API: just what `huggingface_hub.snapshot_download` asks.

Tests that must exercise the real hub client (its headers, its error classes, its on-disk bookkeeping) point
`HF_ENDPOINT` here instead of faking `snapshot_download`. The server speaks the routes the installed client
calls (read from huggingface_hub's `_snapshot_download.py`, `hf_api.py` and `file_download.py`):

- `GET  /api/models/{repo}/revision/{revision}`: repo info; the client needs `sha` (and reads `siblings`);
- `GET  /api/models/{repo}/tree/{revision}?recursive=...`: the file list, with git blob ids and LFS sha256s;
- `HEAD /{repo}/resolve/{revision}/{file}`: `X-Repo-Commit`, `ETag` and `Content-Length`, no body;
- `GET  /{repo}/resolve/{revision}/{file}`: the bytes.

Like the hub, it answers errors with an HTTP status plus `X-Error-Code` / `X-Error-Message` headers, which is
what huggingface_hub's `hf_raise_for_status` turns into its exception classes: a missing token is 401
`RepoNotFound`, a wrong one 401 "Invalid credentials in Authorization header", an unknown repo 404
`RepoNotFound`, a gated one 403 `GatedRepo`, an unknown revision 404 `RevisionNotFound`, an unknown file 404
`EntryNotFound`. Every request must carry `Authorization: Bearer <token>`, and every request is recorded, so
a test can prove the client really sent the token (and a token-leak test cannot pass by never using it).
It listens on 127.0.0.1 only, on a free port, in a daemon thread; use it as a context manager.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "HubRepo", "HubRequest", "files_of"]

_REVISION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class HubRequest:
    """One request as the server saw it: enough to prove what the client sent."""

    method: str
    path: str
    authorization: str | None
    headers: tuple[tuple[str, str], ...]


@dataclass
class HubRepo:
    """A model repo: file name -> bytes at one commit, reachable by that commit or by any of `revisions`."""

    files: Mapping[str, bytes]
    revisions: tuple[str, ...] = ("main",)
    gated: bool = False
    commit: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.commit = digest.hexdigest()  # 40 hex digits, like a git commit id

    def knows(self, revision: str) -> bool:
        return revision == self.commit or revision in self.revisions

    def entry(self, name: str) -> dict[str, object]:
        """One file of the tree listing, as the hub writes it (LFS files carry their sha256)."""
        data = self.files[name]
        out: dict[str, object] = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
        if name.endswith(_LFS_SUFFIXES):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def etag(self, name: str) -> str:
        """The hub's ETag: the sha256 for LFS files, the git blob id for the rest."""
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(_LFS_SUFFIXES) else _git_blob_id(data)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def files_of(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The regular files of `directory` (recursively, '/'-separated names) to serve as a repo."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


class FakeHub:
    """The server. `repos` maps repo id -> HubRepo; `token` is the only credential it accepts."""

    def __init__(self, token: str, repos: Mapping[str, HubRepo]) -> None:
        self.token = token
        self.repos = dict(repos)
        self._requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port (idempotent); the recorded requests stay readable."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()

    def _record(self, request: HubRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "FakeHub/1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: pytest output should hold only failures."""

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _send(
                self, status: int, headers: Mapping[str, str], payload: bytes, body: bool, length: int | None = None
            ) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload) if length is None else length))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str | None, message: str, body: bool, **extra: str) -> None:
                headers = {"Content-Type": "application/json", "X-Error-Message": message, **extra}
                if code is not None:
                    headers["X-Error-Code"] = code
                self._send(status, headers, json.dumps({"error": message}).encode(), body)

            def _answer(self, body: bool) -> None:
                auth = self.headers.get("Authorization")
                path = urlsplit(self.path).path
                hub._record(HubRequest(self.command, self.path, auth, tuple(self.headers.items())))
                if auth is None:
                    self._error(401, "RepoNotFound", "Invalid username or password.", body)
                    return
                if auth != f"Bearer {hub.token}":
                    self._error(401, None, "Invalid credentials in Authorization header", body)
                    return
                for route in (_REVISION, _TREE, _RESOLVE):
                    match = route.match(path)
                    if match:
                        self._repo_route(route, match, body)
                        return
                self._error(404, None, f"no route for {path}", body)

            def _repo_route(self, route: re.Pattern[str], match: re.Match[str], body: bool) -> None:
                repo_id, revision = unquote(match["repo"]), unquote(match["rev"])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found", body)
                    return
                if repo.gated:
                    msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                    self._error(403, "GatedRepo", msg, body)
                    return
                if not repo.knows(revision):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
                    return
                commit = {"X-Repo-Commit": repo.commit}
                json_type = {"Content-Type": "application/json"}
                if route is _REVISION:
                    info = {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": repo.commit,
                        "private": True,
                        "gated": False,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                    }
                    self._send(200, {**json_type, **commit}, json.dumps(info).encode(), body)
                elif route is _TREE:
                    tree = [repo.entry(name) for name in sorted(repo.files)]
                    self._send(200, {**json_type, **commit}, json.dumps(tree).encode(), body)
                else:
                    name = unquote(match["file"])
                    if name not in repo.files:
                        self._error(404, "EntryNotFound", f"{name} does not exist", body, **commit)
                        return
                    data = repo.files[name]
                    headers = {**commit, "ETag": f'"{repo.etag(name)}"', "Content-Type": "application/octet-stream"}
                    self._send(200, headers, data, body, length=len(data))

        return Handler
