"""A small fake Hugging Face Hub for offline tests (standard library + PyYAML only).

It speaks the subset of the Hub HTTP API that the real, unmodified ``huggingface_hub`` 2.4.0 client uses for
create/delete repo, info, tree, refs, commits, preupload + commit (inline files and basic LFS), branches, tags,
PR refs (``create_pr=True``) and file resolve (HEAD/GET with Range). See /work/shared/notes/hub-testing.md.

It binds to 127.0.0.1 only. The client must run with ``HF_HUB_DISABLE_XET=1`` (there is no Xet here): the fixture
in ``tests/conftest_hub.py`` sets that up, together with the endpoint.

    with FakeHub(tmp_path) as hub:          # or hub.start() / hub.stop()
        sha = hub.seed("user/model", {"README.md": b"---\\nlicense: mit\\n---\\n", "w.safetensors": Path(...)})
        hub.set_gated("user/model")         # resolve/info/tree now answer 401/403 + X-Error-Code: GatedRepo
        hub.requests                        # [(method, unquoted path), ...]
        hub.auth_headers                    # Authorization header values seen (never printed)

Standalone: ``python tests/hubserver.py --dir D`` prints its URL and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

HOST = "127.0.0.1"  # loopback only, never configurable
USERNAME = "user"  # namespace used when create_repo gets a bare name, and what whoami answers
TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
PREFIX_TYPE = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX_SHA = re.compile(r"[0-9a-f]{7,40}")
# Same rule as the real Hub (notes, caveat 4): >= 10 MiB, NUL in the first 512 bytes, or a weight/archive suffix.
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy",
                ".npz", ".pkl", ".pickle", ".parquet", ".arrow", ".zip", ".tar", ".gz", ".tgz", ".xz", ".zst",
                ".7z", ".model", ".pb", ".tflite", ".ot", ".joblib", ".wasm")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


class HubError(Exception):
    """An HTTP error answered with the headers the client maps to its exceptions (X-Error-Code)."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the client's parse format


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return size >= LFS_THRESHOLD or b"\0" in sample[:512] or path.lower().endswith(LFS_SUFFIXES)


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, None, f"Invalid path in repo: {path!r}")
    return path


class FakeHub:
    """State (repos, commits, refs) lives in memory and in DIR/state.json; file bytes in DIR/blobs/<sha256>."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        self.blobs = self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path without query), in arrival order
        self.auth_headers: list[str] = []  # Authorization values seen, for "a token was sent" assertions
        self.repos: dict[str, dict] = {}  # "model/ns/name" -> repo dict (see _new_repo)
        self.restrictions: dict[str, dict] = {}  # repo key -> {"kind": "gated"|"private", "allowed": [tokens]}
        state = self.dir / "state.json"
        if state.exists():  # a restart on the same DIR keeps the repos
            saved = json.loads(state.read_text())
            self.repos, self.restrictions = saved["repos"], saved["restrictions"]
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> str:
        server = ThreadingHTTPServer((HOST, 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server, self.url = server, f"http://{HOST}:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # ends serve_forever
        self._server.server_close()
        for conn in list(self._conns):  # wake handler threads parked on idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test helpers ----------------------------------------------------------------------------------------
    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()
            self.auth_headers.clear()

    def count(self, method: str | None = None, contains: str = "") -> int:
        return sum(1 for m, p in list(self.requests) if (method is None or m == method) and contains in p)

    def file_downloads(self) -> list[str]:
        """Paths of GET .../resolve/... requests (file bodies actually sent)."""
        return [p for m, p in list(self.requests) if m == "GET" and "/resolve/" in p]

    def write_requests(self) -> list[tuple[str, str]]:
        """Requests that can change state (uploads, commits, repo/branch creation...)."""
        return [(m, p) for m, p in list(self.requests)
                if m in ("POST", "PUT", "DELETE") and "/paths-info/" not in p and p != "/api/validate-yaml"]

    def set_gated(self, repo_id: str, allowed_tokens=(), repo_type: str = "model") -> None:
        """Reads (info, tree, refs, commits, resolve) answer 401 without token / 403 with a token not in
        allowed_tokens, with X-Error-Code: GatedRepo -> the client raises GatedRepoError."""
        self._restrict(repo_id, repo_type, "gated", allowed_tokens)

    def set_private(self, repo_id: str, allowed_tokens=(), repo_type: str = "model") -> None:
        """Reads by other tokens answer 401/404 with X-Error-Code: RepoNotFound, like the Hub for private repos."""
        self._restrict(repo_id, repo_type, "private", allowed_tokens)

    def unrestrict(self, repo_id: str, repo_type: str = "model") -> None:
        with self.lock:
            self.restrictions.pop(f"{repo_type}/{repo_id}", None)
            self._save()

    def seed(self, repo_id: str, files: dict, *, repo_type: str = "model", revision: str = "main",
             message: str = "Seed files", create_branch: bool = True) -> str:
        """Create the repo if needed and commit `files` ({path: bytes | str | Path}) directly, without the client.
        A missing branch is created from main. Returns the new commit sha."""
        with self.lock:
            repo = self._get_or_create(repo_id, repo_type)
            if create_branch and revision not in repo["branches"] and not revision.startswith("refs/"):
                repo["branches"][revision] = repo["branches"]["main"]
            ops = []
            for path, content in files.items():
                data = Path(content).read_bytes() if isinstance(content, Path) else (
                    content.encode() if isinstance(content, str) else bytes(content))
                ops.append(("add", _check_path(path), self._store_bytes(path, data)))
            return self._commit(repo, revision, ops, message, "")

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.lock:
            return self._resolve(self._repo(f"{repo_type}/{repo_id}"), revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, dict]:
        """{path: entry} at a revision; entry has sha256, size, lfs (bool), oid (git blob id)."""
        with self.lock:
            repo = self._repo(f"{repo_type}/{repo_id}")
            return dict(repo["commits"][self._resolve(repo, revision)]["files"])

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        return (self.blobs / self.files(repo_id, revision, repo_type)[path]["sha256"]).read_bytes()

    # ---- state -----------------------------------------------------------------------------------------------
    def _restrict(self, repo_id, repo_type, kind, allowed_tokens) -> None:
        with self.lock:
            self.restrictions[f"{repo_type}/{repo_id}"] = {"kind": kind, "allowed": list(allowed_tokens)}
            self._save()

    def _save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({"repos": self.repos, "restrictions": self.restrictions}))
        os.replace(tmp, self.dir / "state.json")

    def _repo(self, key: str) -> dict:
        if key not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository not found: {key}")
        return self.repos[key]

    def _get_or_create(self, repo_id: str, repo_type: str, private: bool = False) -> dict:
        key = f"{repo_type}/{repo_id}"
        if key not in self.repos:
            # Like the Hub, a new repo starts with one commit holding .gitattributes.
            self.repos[key] = {"id": repo_id, "type": repo_type, "private": private, "createdAt": _now(),
                               "branches": {}, "tags": {}, "prs": {}, "commits": {}}
            entry = self._store_bytes(".gitattributes", GITATTRIBUTES)
            self._commit(self.repos[key], None, [("add", ".gitattributes", entry)], "initial commit", "")
        return self.repos[key]

    def _store_bytes(self, path: str, data: bytes) -> dict:
        sha256 = hashlib.sha256(data).hexdigest()
        blob = self.blobs / sha256
        if not blob.exists():
            tmp = self.blobs / f"tmp-{sha256}-{threading.get_ident()}"
            tmp.write_bytes(data)
            os.replace(tmp, blob)
        return self._entry(sha256, len(data), is_lfs(path, len(data), data[:512]), data)

    @staticmethod
    def _entry(sha256: str, size: int, lfs: bool, data: bytes | None = None) -> dict:
        # The tree "oid" of an LFS file is the git blob id of its pointer file, as in git.
        oid = git_blob_sha1(lfs_pointer(sha256, size)) if lfs else git_blob_sha1(data)
        return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}

    def _resolve(self, repo: dict, rev: str) -> str:
        """Branch, tag, refs/heads|tags|pr/..., or a (prefix of a) commit sha -> commit sha."""
        rev = rev.removeprefix("refs/heads/")
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev.removeprefix("refs/tags/") in repo["tags"]:
            return repo["tags"][rev.removeprefix("refs/tags/")]
        if rev in repo["prs"]:
            return repo["prs"][rev]
        if HEX_SHA.fullmatch(rev):
            found = [c for c in repo["commits"] if c.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _commit(self, repo: dict, branch: str | None, ops: list, summary: str, description: str,
                parent: str | None = None) -> str:
        """Apply ops to the head of `branch` (a branch name or refs/pr/N) and move the ref. Caller holds lock."""
        ref_table = repo["prs"] if branch and branch.startswith("refs/pr/") else repo["branches"]
        if branch is not None and branch not in ref_table:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        head = ref_table[branch] if branch is not None else None
        if parent is not None and head is not None and not head.startswith(parent):
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        files = dict(repo["commits"][head]["files"]) if head else {}
        for kind, path, entry in ops:
            if kind == "add":
                files[path] = entry
            elif kind == "delete_file":
                if files.pop(path, None) is None:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
            else:  # delete_folder
                doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
        sha = hashlib.sha1(f"{head}{summary}{time.time_ns()}{len(repo['commits'])}".encode()).hexdigest()
        repo["commits"][sha] = {"parent": head, "files": files, "title": summary, "message": description,
                                "date": _now()}
        ref_table[branch or "main"] = sha
        self._save()
        return sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response therefore sets Content-Length
    timeout = 60  # idle keep-alive connections close on their own: no handler thread waits forever

    # ---- plumbing --------------------------------------------------------------------------------------------
    def setup(self):
        super().setup()
        self.hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        self.hub._conns.add(self.connection)

    def finish(self):
        self.hub._conns.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # quiet: tests read hub.requests instead (and tokens never get logged)
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _body_chunks(self):
        """Yield the request body, whether sent with Content-Length or chunked (streamed LFS PUTs)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:  # ends at the 0-size chunk; a dead peer raises instead of looping
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError("client closed mid-body")
                left -= len(chunk)
                yield chunk

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _dispatch(self):
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.raw_parts = split.path.split("/")[1:]
        self.parts = [unquote(p) for p in self.raw_parts]  # a quoted "refs%2Fpr%2F1" stays one segment
        auth = self.headers.get("Authorization")
        with self.hub.lock:
            self.hub.requests.append((self.command, unquote(split.path)))
            if auth:
                self.hub.auth_headers.append(auth)
        self.token = auth.split(" ", 1)[-1] if auth else None
        self.base = f"http://{self.headers.get('Host', self.hub.url[7:])}"
        streamed = self.command == "PUT" and self.parts[:1] == ["_lfs"]
        try:
            self.body = b"" if streamed else b"".join(self._body_chunks())  # drain first: keeps keep-alive in sync
            self._route()
        except HubError as e:
            if streamed:
                self.close_connection = True  # the PUT body may be unread
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit  # lets the client cache "no such file at this commit"
            self._json({"error": e.message}, e.status, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug here should show up as a clear 500, not a hung client
            self.close_connection = True
            self._json({"error": f"FakeHub internal error: {type(e).__name__}: {e}"}, 500)

    # ---- routing ---------------------------------------------------------------------------------------------
    def _route(self):
        p, m = self.parts, self.command
        if p[:1] == ["api"]:
            return self._route_api(p[1:], m)
        if p[:1] == ["_lfs"] and m == "PUT" and len(p) == 2:
            return self._lfs_put(p[1])
        repo_type = "model"
        if p and p[0] in PREFIX_TYPE:
            repo_type, p = PREFIX_TYPE[p[0]], p[1:]
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            return self._lfs_batch(f"{repo_type}/{p[0]}/{p[1][:-4]}")
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(f"{repo_type}/{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, None, f"FakeHub: no route for {m} /{'/'.join(p)}")

    def _route_api(self, p: list[str], m: str):
        if p == ["repos", "create"] and m == "POST":
            return self._create_repo(json.loads(self.body or b"{}"))
        if p == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo(json.loads(self.body or b"{}"))
        if p == ["validate-yaml"] and m == "POST":
            return self._validate_yaml(json.loads(self.body or b"{}"))
        if p == ["whoami-v2"] and m == "GET":
            if not self.token:
                raise HubError(401, None, "Invalid credentials in Authorization header")
            return self._json({"type": "user", "name": USERNAME, "fullname": "Test User",
                               "avatarUrl": "/avatars/user.svg", "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if len(p) < 3 or not p[0].endswith("s") or p[0][:-1] not in TYPE_PREFIX:
            raise HubError(404, None, f"FakeHub: no route for {m} /api/{'/'.join(p)}")
        key, rest = f"{p[0][:-1]}/{p[1]}/{p[2]}", p[3:]
        action = rest[0] if rest else ""
        if action.startswith("xet-"):
            raise HubError(501, None, "FakeHub has no Xet storage: run the client with HF_HUB_DISABLE_XET=1")
        with self.hub.lock:  # whole request under the lock: simple, and requests here are small
            repo = self.hub._repo(key)
            writes = {"preupload", "commit", "branch", "tag"}
            if action not in writes:
                self._check_read_access(key)
            if not rest or (action == "revision" and len(rest) == 2):
                return self._info(repo, rest[1] if rest else "main")
            if action == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]).strip("/"))
            if action == "refs" and m == "GET":
                return self._refs(repo)
            if action == "commits" and len(rest) == 2:
                return self._commits(repo, rest[1])
            if action == "paths-info" and len(rest) == 2 and m == "POST":
                return self._paths_info(repo, rest[1])
            if action == "preupload" and len(rest) == 2 and m == "POST":
                return self._preupload(repo, rest[1])
            if action == "commit" and len(rest) == 2 and m == "POST":
                return self._create_commit(repo, rest[1])
            if action == "branch" and len(rest) == 2 and m in ("POST", "DELETE"):
                return self._branch(repo, rest[1])
            if action == "tag" and len(rest) == 2 and m in ("POST", "DELETE"):
                return self._tag(repo, rest[1])
        raise HubError(404, None, f"FakeHub: no route for {m} /api/{'/'.join(p)}")

    def _check_read_access(self, key: str) -> None:
        rule = self.hub.restrictions.get(key)
        if rule is None or (self.token is not None and self.token in rule["allowed"]):
            return
        status = 401 if self.token is None else (403 if rule["kind"] == "gated" else 404)
        if rule["kind"] == "gated":
            raise HubError(status, "GatedRepo", f"Access to {key} is restricted. You must have access to it "
                           "and be authenticated to access it. Please log in.")
        raise HubError(status, "RepoNotFound", f"Repository not found: {key}")

    # ---- repos -----------------------------------------------------------------------------------------------
    def _repo_url(self, repo: dict) -> str:
        return f"{self.base}/{TYPE_PREFIX[repo['type']]}{repo['id']}"

    def _create_repo(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USERNAME}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub.lock:
            key = f"{repo_type}/{repo_id}"
            if key in self.hub.repos:  # never the "conflicting operation" text: the client would retry forever
                url = self._repo_url(self.hub.repos[key])
                body = {"error": f"You already created this {repo_type} repo", "url": url}
                return self._json(body, 409, {"X-Error-Message": body["error"]})
            repo = self.hub._get_or_create(repo_id, repo_type, private)
            self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict):
        key = f"{payload.get('type') or 'model'}/{payload.get('organization') or USERNAME}/{payload['name']}"
        with self.hub.lock:
            self.hub._repo(key)
            del self.hub.repos[key]
            self.hub.restrictions.pop(key, None)
            self.hub._save()
        self._json({})

    def _validate_yaml(self, payload: dict):
        try:
            _front_matter(payload.get("content", ""))
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": str(e)}], "warnings": []}, 400)
        self._json({"errors": [], "warnings": []})

    def _info(self, repo: dict, rev: str):
        sha = self.hub._resolve(repo, rev)
        commit = repo["commits"][sha]
        files = commit["files"]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            sib: dict = {"rfilename": path}
            if blobs:
                e = files[path]
                sib.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    sib["lfs"] = {"size": e["size"], "sha256": e["sha256"],
                                  "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
            siblings.append(sib)
        card = {}
        if "README.md" in files:
            try:
                card = _front_matter((self.hub.blobs / files["README.md"]["sha256"]).read_text("utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                card = {}
        rule = self.hub.restrictions.get(f"{repo['type']}/{repo['id']}", {})
        tags = list(card.get("tags") or []) + [t for t in [card.get("library_name"), card.get("license")] if t]
        data = {"_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24], "id": repo["id"],
                "author": repo["id"].split("/")[0], "sha": sha, "lastModified": commit["date"],
                "createdAt": repo["createdAt"], "private": repo["private"] or rule.get("kind") == "private",
                "gated": "manual" if rule.get("kind") == "gated" else False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": tags, "siblings": siblings, "usedStorage": sum(e["size"] for e in files.values())}
        if repo["type"] == "model":
            data.update(modelId=repo["id"], library_name=card.get("library_name"),
                        pipeline_tag=card.get("pipeline_tag"))
        if card:
            data["cardData"] = card
        self._json(data)

    def _tree_entry(self, path: str, e: dict | None, sha: str) -> dict:
        if e is None:  # a directory
            return {"type": "directory", "oid": hashlib.sha1(f"{sha}:{path}".encode()).hexdigest(),
                    "size": 0, "path": path}
        out = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e["lfs"]:
            out["lfs"] = {"oid": e["sha256"], "size": e["size"],
                          "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
        return out

    def _tree(self, repo: dict, rev: str, base: str):
        sha = self.hub._resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        prefix = base + "/" if base else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        dirs, out = set(), []
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            for i in range(1, len(rel) if recursive else min(len(rel), 2)):
                dirs.add(prefix + "/".join(rel[:i]))
            if recursive or len(rel) == 1:
                out.append(self._tree_entry(path, files[path], sha))
        if base and not out and not dirs:
            raise HubError(404, "EntryNotFound", f"{base} does not exist on {rev}", commit=sha)
        self._json(sorted([self._tree_entry(d, None, sha) for d in dirs] + out, key=lambda x: x["path"]))

    def _paths_info(self, repo: dict, rev: str):
        sha = self.hub._resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        out = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in files:
                out.append(self._tree_entry(path, files[path], sha))
            elif any(f.startswith(path + "/") for f in files):
                out.append(self._tree_entry(path, None, sha))
        self._json(out)

    def _refs(self, repo: dict):
        def refs(table: dict, fmt: str) -> list:
            return [{"name": n, "ref": fmt.format(n), "targetCommit": s} for n, s in sorted(table.items())]

        self._json({"branches": refs(repo["branches"], "refs/heads/{}"), "converts": [],
                    "tags": refs(repo["tags"], "refs/tags/{}"), "pullRequests": refs(repo["prs"], "{}")})

    def _commits(self, repo: dict, rev: str):
        sha, out = self.hub._resolve(repo, rev), []
        while sha is not None:  # the parent chain is finite and acyclic (parents always exist before children)
            c = repo["commits"][sha]
            out.append({"id": sha, "title": c["title"], "message": c["message"], "date": c["date"],
                        "authors": [{"user": USERNAME, "avatar": None}]})
            sha = c["parent"]
        self._json(out)

    def _branch(self, repo: dict, name: str):
        if self.command == "DELETE":
            if name not in repo["branches"] or name == "main":
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
            del repo["branches"][name]
        else:
            if name in repo["branches"]:
                raise HubError(409, None, f"Reference already exists: refs/heads/{name}")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            repo["branches"][name] = self.hub._resolve(repo, start)
        self.hub._save()
        self._json({})

    def _tag(self, repo: dict, rev: str):
        if self.command == "DELETE":
            if repo["tags"].pop(rev, None) is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        else:
            tag = json.loads(self.body or b"{}")["tag"]
            if tag in repo["tags"]:
                raise HubError(409, None, f"Reference already exists: refs/tags/{tag}")
            repo["tags"][tag] = self.hub._resolve(repo, rev)
        self.hub._save()
        self._json({})

    # ---- uploads ---------------------------------------------------------------------------------------------
    def _preupload(self, repo: dict, rev: str):
        sha = self.hub._resolve(repo, rev)
        files = repo["commits"][sha]["files"]
        out = []
        for f in json.loads(self.body)["files"]:
            lfs = is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            old = files.get(f["path"])
            # The client skips unchanged files when this oid equals its local one: sha256 for LFS, git sha1 else.
            oid = None if old is None else (old["sha256"] if old["lfs"] else old["oid"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json({"files": out, "commitOid": sha})

    def _create_commit(self, repo: dict, rev: str):
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        ops = []
        for item in lines:
            key, v = item["key"], item["value"]
            if key == "file":  # sent inline, so stored as a regular git file whatever its size or suffix
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                entry = self.hub._store_bytes(_check_path(v["path"]), data)
                ops.append(("add", v["path"], FakeHub._entry(entry["sha256"], len(data), False, data)))
            elif key == "lfsFile":
                blob = self.hub.blobs / v["oid"]
                if not HEX64.fullmatch(v["oid"]) or not blob.exists():
                    raise HubError(422, None, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                ops.append(("add", _check_path(v["path"]), FakeHub._entry(v["oid"], blob.stat().st_size, True)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append(("delete_file" if key == "deletedFile" else "delete_folder", v["path"], None))
        pr_url, rev = None, rev.removeprefix("refs/heads/")
        if self.query.get("create_pr") == "1":
            # A PR is a new ref refs/pr/N starting at the head of `rev`; the commit lands there, not on `rev`.
            num = len(repo["prs"]) + 1
            repo["prs"][f"refs/pr/{num}"] = self.hub._resolve(repo, rev)
            rev = f"refs/pr/{num}"
            pr_url = f"{self._repo_url(repo)}/discussions/{num}"
        elif rev not in repo["branches"] and rev not in repo["prs"]:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev} (commits go to a branch or refs/pr/N)")
        sha = self.hub._commit(repo, rev, ops, header.get("summary", ""), header.get("description", ""),
                               header.get("parentCommit"))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                    "pullRequestUrl": pr_url, "hookOutput": ""})

    def _lfs_batch(self, key: str):
        payload = json.loads(self.body)
        with self.hub.lock:
            self.hub._repo(key)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            out = {"oid": oid, "size": size, "authenticated": True}
            if not HEX64.fullmatch(oid):
                out["error"] = {"code": 422, "message": "oid must be a sha256 hex digest"}
            elif not (self.hub.blobs / oid).exists():  # already stored -> no "actions": the client skips it
                out["actions"] = {"upload": {"href": f"{self.base}/_lfs/{oid}"}}
            objects.append(out)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str):
        if not HEX64.fullmatch(oid):
            raise HubError(400, None, "bad oid")
        tmp = self.hub.blobs / f"tmp-{oid}-{threading.get_ident()}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for chunk in self._body_chunks():  # streamed to disk: big weights never sit in memory
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != oid:
                raise HubError(400, None, f"sha256 mismatch: got {digest.hexdigest()}, expected {oid}")
            os.replace(tmp, self.hub.blobs / oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200)

    # ---- downloads -------------------------------------------------------------------------------------------
    def _resolve_file(self, key: str, rev: str, path: str):
        with self.hub.lock:
            repo = self.hub._repo(key)
            self._check_read_access(key)
            sha = self.hub._resolve(repo, rev)
            entry = repo["commits"][sha]["files"].get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}", commit=sha)
        size, blob = entry["size"], self.hub.blobs / entry["sha256"]
        # ETag: git blob sha1 for regular files, sha256 for LFS files (the client names cache blobs after it).
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and self.command == "GET" and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # suffix range: the last N bytes
                start = max(size - int(match[2]), 0)
            if start > end:
                raise HubError(416, None, f"Range not satisfiable for size {size}")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            with open(blob, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)


def _front_matter(text: str) -> dict:
    """YAML between a leading '---' line and the next '---' line, as the Hub reads model cards."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    data = yaml.safe_load(match[1]) if match else None
    return data if isinstance(data, dict) else {}


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake Hugging Face Hub on 127.0.0.1 for offline tests")
    parser.add_argument("--dir", required=True, help="data directory (state.json and blobs/)")
    args = parser.parse_args()
    hub = FakeHub(args.dir)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(hub.start(), flush=True)
    done.wait()
    hub.stop()


if __name__ == "__main__":
    main()
