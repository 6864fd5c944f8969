"""A local server that speaks the Hugging Face Hub's file API, for ``imageserve download``'s tests.

It answers what huggingface_hub asks (``HF_ENDPOINT`` points it here): ``GET /api/models/{repo}``
(with ``/revision/{rev}``; sizes, git blob ids and LFS sha256 of every file), the recursive file tree
``GET /api/models/{repo}/tree/{rev}``, and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with the
Hub's ``X-Repo-Commit`` and ``ETag`` headers and byte ranges. Repositories are sets of files;
``*.safetensors`` are served as LFS files, as on the Hub. A repository may keep older commits, which
answer when asked for by their hash (as pinned revisions are); any other revision is main. It can cut
a file's first download halfway (to test resuming) and list a wrong hash for a file (to test
verification). Every request is recorded.
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
class Repo:
    files: dict[str, bytes]
    commit: str
    older: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files then

    def at(self, revision: str | None) -> tuple[dict[str, bytes], str]:
        """The files and commit ``revision`` names: an older commit by its hash, else main."""
        if revision in self.older:
            return self.older[revision], revision
        return self.files, self.commit


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    cut_once: set[tuple[str, str]] = field(default_factory=set)   # (repo, path): first GET stops halfway
    wrong_hash: set[tuple[str, str]] = field(default_factory=set)  # (repo, path): the API lists a wrong sha256
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    @staticmethod
    def repo_from_folder(folder: Path, commit: str, extra: dict[str, bytes] | None = None) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return Repo({**files, **(extra or {})}, commit)

    def fetched(self, repo_id: str) -> set[str]:
        """Files of ``repo_id`` whose content was sent (GET of a resolve URL)."""
        prefix = f"/{repo_id}/resolve/"
        return {path.split("/", 1)[1] for method, url, _ in self.requests if method == "GET" and url.startswith(prefix)
                for path in [url[len(prefix):]]}

    def ranges(self, repo_id: str, path: str) -> list[str]:
        return [r for method, url, r in self.requests
                if method == "GET" and r and url.startswith(f"/{repo_id}/resolve/") and url.endswith("/" + path)]

    # ---- what the Hub answers ---------------------------------------------------------------------

    @staticmethod
    def lfs(path: str) -> bool:
        return path.endswith(".safetensors")

    def sibling(self, repo_id: str, path: str, data: bytes) -> dict:
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # git's object id
        entry = {"rfilename": path, "size": len(data), "blobId": blob}
        if self.lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            if (repo_id, path) in self.wrong_hash:
                sha = "0" * 64
            entry["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
        return entry

    @staticmethod
    def tree_entry(sibling: dict) -> dict:
        """A file of the tree listing, as the Hub words it (oid, lfs.oid) from a model-info sibling."""
        entry = {"type": "file", "path": sibling["rfilename"], "size": sibling["size"], "oid": sibling["blobId"]}
        if "lfs" in sibling:
            lfs = sibling["lfs"]
            entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
        return entry

    def etag(self, path: str, data: bytes) -> str:
        if self.lfs(path):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def _find(self):
                url = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, url, self.headers.get("Range")))
                if url.startswith("/api/models/"):
                    rest = url[len("/api/models/"):]
                    if "/tree/" in rest:
                        repo_id, _, revision = rest.partition("/tree/")
                        return "tree", repo_id, None, revision.split("/")[0]
                    repo_id, _, revision = rest.partition("/revision/")
                    return "api", repo_id, None, revision or None
                for repo_id in hub.repos:
                    prefix = f"/{repo_id}/resolve/"
                    if url.startswith(prefix):
                        revision, _, path = url[len(prefix):].partition("/")
                        return "file", repo_id, path, revision
                return None, None, None, None

            def _not_found(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self._answer(with_body=True)

            def do_HEAD(self):
                self._answer(with_body=False)

            def _answer(self, with_body: bool):
                kind, repo_id, path, revision = self._find()
                repo = hub.repos.get(repo_id) if repo_id else None
                if repo is None:
                    return self._not_found()
                files, commit = repo.at(revision)
                if kind in ("api", "tree"):
                    siblings = [hub.sibling(repo_id, p, d) for p, d in sorted(files.items())]
                    if kind == "api":
                        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                           "siblings": siblings}).encode()
                    else:
                        body = json.dumps([hub.tree_entry(s) for s in siblings]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if with_body:
                        self.wfile.write(body)
                    return None
                data = files.get(path)
                if data is None:
                    return self._not_found()
                start = 0
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[len("bytes="):].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hub.etag(path, data)}"')
                if hub.lfs(path):
                    self.send_header("X-Linked-Etag", f'"{hub.etag(path, data)}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not with_body:
                    return None
                if (repo_id, path) in hub.cut_once and not start:
                    hub.cut_once.discard((repo_id, path))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                self.wfile.write(data[start:])
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"
