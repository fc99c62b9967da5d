"""A small Hugging Face Hub on 127.0.0.1 for tests: the routes huggingface_hub uses to create a repo, commit
regular (non-LFS) files, compare them and download them, with the Hub's status codes and error headers.

Run the client with HF_HUB_DISABLE_XET=1: every file is then answered "regular" at preupload and travels
base64-encoded inside the NDJSON commit, so no LFS or Xet storage is involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

MAX_BODY = 256 << 20  # bounded reads: the largest test upload (B0, base64) is ~30 MB
LIFETIME_S = 600  # the server stops by itself even if a test forgets to
INVALID_TOKEN = 'Invalid credentials in Authorization header'  # the Hub's own wording (the client matches it)
SERVER_ERROR = "Internal Error - We're working hard to fix this as soon as possible!"
_REPO = r'(?P<repo>[^/]+/[^/]+)'


def git_blob_id(data: bytes) -> str:
    """The git object id of a file, as the Hub reports for regular files (preupload oid, paths-info, ETag)."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    files: dict[str, bytes]  # the whole tree at this commit


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    history: list[str] = field(default_factory=list)  # every commit oid, oldest first


class HubError(Exception):
    """An answer other than 200: status, JSON body, X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **body: str):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.body = status, message, code, commit, body

    def headers(self) -> dict[str, str]:
        headers = {'X-Error-Message': self.message, 'X-Error-Code': self.code, 'X-Repo-Commit': self.commit}
        return {k: v for k, v in headers.items() if v}


class HubServer:
    """`with HubServer(token) as hub:` serves on `hub.endpoint` until the block ends (or LIFETIME_S)."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # 'METHOD /path', in arrival order
        self.fail: dict[str, int] = {}  # route name -> status to answer instead (e.g. {'commit': 500})
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.endpoint = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True)
        self._timer = threading.Timer(LIFETIME_S, self._httpd.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> HubServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- what tests look at ---------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.branches[revision]].files)

    def commits(self, repo_id: str) -> list[Commit]:
        with self._lock:
            repo = self.repos.get(repo_id)
            return [repo.commits[oid] for oid in repo.history] if repo else []

    def record(self, request: str) -> None:
        with self._lock:
            self.requests.append(request)

    # --- routes ------------------------------------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, re.Pattern, Callable]]:
        return [
            ('POST', 'create', re.compile(r'^/api/repos/create$'), self._create),
            ('POST', 'validate-yaml', re.compile(r'^/api/validate-yaml$'), self._validate_yaml),
            ('POST', 'preupload', re.compile(rf'^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$'), self._preupload),
            ('POST', 'commit', re.compile(rf'^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$'), self._commit),
            ('POST', 'paths-info', re.compile(rf'^/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)$'), self._paths_info),
            ('POST', 'branch', re.compile(rf'^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$'), self._branch),
            ('GET', 'info', re.compile(rf'^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$'), self._info),
            ('GET', 'resolve', re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$'), self._resolve),
        ]

    def _create(self, req: Request) -> dict:
        req.require_token()
        body = req.json()
        repo_id = f'{body["organization"]}/{body["name"]}' if body.get('organization') else body['name']
        with self._lock:
            if repo_id in self.repos:  # the client reads the url from this answer too
                raise HubError(409, 'You already created this model repo', url=f'{self.endpoint}/{repo_id}')
            repo = self.repos[repo_id] = Repo(private=body.get('visibility') == 'private')
            # A new Hub repo starts with one commit holding .gitattributes.
            self._add_commit(repo, 'main', 'initial commit', '', {'.gitattributes': b'*.safetensors filter=lfs\n'})
        return {'url': f'{self.endpoint}/{repo_id}', 'name': repo_id}

    def _validate_yaml(self, req: Request) -> dict:
        content = req.json()['content']
        match = re.match(r'^---\n(.*?)\n---\n', content, re.S)
        errors = _card_metadata_errors(match.group(1)) if match else []
        if errors:
            raise HubError(400, errors[0])
        return {'errors': [], 'warnings': []}

    def _preupload(self, req: Request) -> dict:
        req.require_token()
        files = self._tree(req)
        return {
            'files': [
                {
                    'path': f['path'],
                    'uploadMode': 'regular',
                    'shouldIgnore': False,
                    'oid': git_blob_id(files[f['path']]) if f['path'] in files else None,
                }
                for f in req.json()['files']
            ]
        }

    def _commit(self, req: Request) -> dict:
        req.require_token()
        if req.query.get('create_pr'):
            raise HubError(400, 'pull requests are not served here')
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next(line['value'] for line in lines if line['key'] == 'header')
        with self._lock:
            repo, head = self._ref(req)
            parent = header.get('parentCommit')
            if parent and parent != head.oid:
                raise HubError(412, 'A commit has happened since. Please refresh and try again.')
            files = dict(head.files)
            for line in lines:
                if line['key'] != 'header':
                    self._apply(files, line['key'], line['value'])
            commit = self._add_commit(repo, req.rev, header['summary'], header.get('description', ''), files)
        return {
            'commitUrl': f'{self.endpoint}/{req.repo_id}/commit/{commit.oid}',
            'commitOid': commit.oid,
            'success': True,
        }

    @staticmethod
    def _apply(files: dict[str, bytes], key: str, value: dict) -> None:
        if key == 'file' and value.get('encoding') == 'base64':
            files[value['path']] = base64.b64decode(value['content'])
        elif key == 'deletedFile':
            files.pop(value['path'], None)
        else:  # lfsFile / deletedFolder / copies: never asked for, since preupload answers "regular"
            raise HubError(400, f'unsupported commit operation {key!r}')

    def _paths_info(self, req: Request) -> list:
        files = self._tree(req)
        return [
            {'type': 'file', 'path': p, 'oid': git_blob_id(files[p]), 'size': len(files[p])}
            for p in req.form().get('paths', [])
            if p in files
        ]

    def _branch(self, req: Request) -> dict:
        req.require_token()
        with self._lock:
            repo = self._repo(req)
            if req.rev in repo.branches:
                raise HubError(409, 'Reference already exists')
            start = (req.json() or {}).get('startingPoint') or 'main'
            repo.branches[req.rev] = repo.branches.get(start, start)
        return {}

    def _info(self, req: Request) -> dict:
        with self._lock:
            repo, head = self._ref(req)
            return {
                'id': req.repo_id,
                'sha': head.oid,
                'private': repo.private,
                'siblings': [{'rfilename': p} for p in sorted(head.files)],
            }

    def _resolve(self, req: Request) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            _, head = self._ref(req)
        path = urllib.parse.unquote(req.match['path'])
        if path not in head.files:
            raise HubError(404, f'{path} does not exist at {req.rev}', 'EntryNotFound', head.oid)
        data = head.files[path]
        return data, {'X-Repo-Commit': head.oid, 'ETag': f'"{git_blob_id(data)}"'}

    # --- state (callers hold the lock where it matters) --------------------------------------------------------

    def _repo(self, req: Request) -> Repo:
        repo = self.repos.get(req.repo_id)
        # As the Hub: a private repo is invisible without the owner's token (writes check the token first).
        if repo is None or (repo.private and not req.has_token()):
            raise HubError(404 if repo is None else 401, 'Repository not found', 'RepoNotFound')
        return repo

    def _ref(self, req: Request) -> tuple[Repo, Commit]:
        repo = self._repo(req)
        oid = repo.branches.get(req.rev, req.rev)
        if oid not in repo.commits:
            raise HubError(404, f'Invalid rev id: {req.rev}', 'RevisionNotFound')
        return repo, repo.commits[oid]

    def _tree(self, req: Request) -> dict[str, bytes]:
        with self._lock:
            return dict(self._ref(req)[1].files)

    def _add_commit(self, repo: Repo, branch: str, title: str, description: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f'{self._counter}:{title}'.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, title, description, files)
        repo.branches[branch] = oid
        repo.history.append(oid)
        return repo.commits[oid]


def _card_metadata_errors(text: str) -> list[str]:
    """The model-card checks the Hub applies that matter here: a YAML mapping, a well-formed model-index."""
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f'YAML is invalid: {err}']
    if not isinstance(meta, dict):
        return ['metadata must be a YAML mapping']
    for model in meta.get('model-index') or []:
        for result in model.get('results') or []:
            ok = (
                result.get('task', {}).get('type')
                and result.get('dataset', {}).get('type')
                and result.get('dataset', {}).get('name')
                and all('type' in m and 'value' in m for m in result.get('metrics', []))
            )
            if not ok:
                return [f'"model-index[0].results" is invalid in {model.get("name")}']
    return []


@dataclass
class Request:
    handler: BaseHTTPRequestHandler
    token: str
    match: re.Match
    query: dict[str, str]
    body: bytes

    @property
    def repo_id(self) -> str:
        return self.match['repo']

    @property
    def rev(self) -> str:
        return urllib.parse.unquote(self.match['rev'] or 'main')

    def has_token(self) -> bool:
        return self.handler.headers.get('Authorization') == f'Bearer {self.token}'

    def require_token(self) -> None:
        if not self.has_token():
            raise HubError(401, INVALID_TOKEN)

    def json(self):
        return json.loads(self.body or b'null')

    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.body.decode())


def _handler_for(hub: HubServer):
    routes = hub.routes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'  # keep-alive, as the client expects
        timeout = 30  # an idle kept-alive connection ends its handler thread

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_GET(self) -> None:
            self._dispatch('GET', send_body=True)

        def do_HEAD(self) -> None:
            self._dispatch('GET', send_body=False)

        def do_POST(self) -> None:
            self._dispatch('POST', send_body=True)

        def _dispatch(self, method: str, send_body: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            hub.record(f'{self.command} {url.path}')
            length = int(self.headers.get('Content-Length') or 0)
            if length > MAX_BODY:
                return self._send(413, b'{"error": "payload too large"}', {}, send_body)
            body = self.rfile.read(length) if length else b''
            for route_method, name, pattern, action in routes:
                match = pattern.match(url.path)
                if route_method == method and match:
                    return self._run(
                        name,
                        action,
                        Request(self, hub.token, match, dict(urllib.parse.parse_qsl(url.query)), body),
                        send_body,
                    )
            self._send(404, b'{"error": "Not Found"}', {}, send_body)

        def _run(self, name: str, action: Callable, req: Request, send_body: bool) -> None:
            try:
                if name in hub.fail:
                    raise HubError(hub.fail[name], SERVER_ERROR)
                answer = action(req)
            except HubError as err:
                body = json.dumps({'error': err.message, **err.body}).encode()
                return self._send(err.status, body, err.headers(), send_body)
            if isinstance(answer, tuple):  # a file: raw bytes and its headers
                return self._send(200, answer[0], answer[1], send_body, 'application/octet-stream')
            self._send(200, json.dumps(answer).encode(), {}, send_body)

        def _send(
            self,
            status: int,
            data: bytes,
            headers: dict[str, str],
            send_body: bool,
            content_type: str = 'application/json',
        ) -> None:
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            self.send_header('Content-Length', str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(data)

    return Handler
