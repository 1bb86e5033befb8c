"""A small stand-in for the Hugging Face Hub's API on 127.0.0.1: what create_repo, create_branch and upload_folder
of huggingface_hub 2.4 call, and nothing more. It records every repo, branch and commit so tests can check on
the server's side what arrived.

The endpoints (read from huggingface_hub's hf_api.py and _commit_api.py):
- POST /api/repos/create                       {"name", "organization", "visibility"} -> {"url"}; 409 if it exists
- POST /api/models/{repo}/branch/{branch}      a branch from main's head; 409 if it exists
- POST /api/models/{repo}/preupload/{revision} which files go inline ("regular") and which by LFS/Xet
- POST /api/models/{repo}/commit/{revision}    NDJSON, a header line then a line per file -> {"commitUrl", "commitOid"}
- POST /api/validate-yaml                      the README's front matter (create_commit's path without hf_xet)

The Hub answers "lfs" in preupload for weights, and huggingface_hub then uploads them through
Xet's storage, a protocol of its own; this fake answers "regular" for every file (the upload
mode is the server's call), so their bytes arrive base64-encoded inside the commit. Every call
needs the token given to the server; a commit to a branch that does not exist is refused with
404, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Commit:
    """One commit as the server received it."""

    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]
    oid: str


@dataclass
class Repo:
    """A model repo: its visibility and, per branch, the files at its head and its commits."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[Commit] = field(default_factory=list)


class FakeHub:
    """The server and what it holds; `url` is its endpoint (give it to HfApi or HF_ENDPOINT)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commits(self, repo_id: str) -> list[Commit]:
        """The repo's commits, oldest first."""
        return self.repos[repo_id].commits

    # Each handler returns (status, JSON body).
    def create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = "/".join(part for part in (payload.get("organization"), payload["name"]) if part)
        if payload.get("type") not in (None, "model"):
            return 400, {"error": "this fake only holds model repos"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo_id: str, branch: str) -> tuple[int, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if branch in repo.branches:
            return 409, {"error": f"Reference already exists: refs/heads/{branch}"}
        repo.branches[branch] = dict(repo.branches["main"])
        return 200, {}

    def preupload(self, repo_id: str, payload: dict) -> tuple[int, dict]:
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        return 200, {"files": [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                               for entry in payload["files"]]}

    def commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}
        header, files = {}, {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file" and item["value"]["encoding"] == "base64":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return 400, {"error": f"this fake does not take {item['key']} operations"}
        oid = hashlib.sha1(body + str(len(repo.commits)).encode()).hexdigest()
        repo.branches[revision].update(files)
        repo.commits.append(Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""),
                                   files, oid))
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_) -> None:  # quiet: the tests read hub.calls
            pass

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub.lock:
                hub.calls.append(("POST", path))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    status, answer = 401, {"error": "Invalid credentials in Authorization header"}
                else:
                    status, answer = self._route(path, body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _route(self, path: str, body: bytes) -> tuple[int, dict]:
            if path == "/api/repos/create":
                return hub.create_repo(json.loads(body))
            if path == "/api/validate-yaml":
                return 200, {"errors": [], "warnings": []}
            parts = path.split("/")  # '', 'api', 'models', NAMESPACE, NAME, ACTION, REVISION
            if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
                repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], unquote(parts[6])
                if action == "branch":
                    return hub.create_branch(repo_id, revision)
                if action == "preupload":
                    return hub.preupload(repo_id, json.loads(body))
                if action == "commit":
                    return hub.commit(repo_id, revision, body)
            return 404, {"error": f"this fake Hub has no {path}"}

    return Handler
