"""An in-process stand-in for the part of Grafana's HTTP API the plugin uses (no Grafana server can
be installed here), checking every request against Grafana's documented API
(docs/sources/developers/http_api/{folder,dashboard,annotations}.md, Grafana 10/11):

- ``Authorization: Bearer <token>`` on every request, else 401 ``{"message": "Unauthorized"}``;
- JSON bodies with ``Content-Type: application/json``, only the documented fields, of the
  documented types (Go's decoder reads ``null`` as "not given", so ``null`` is accepted for
  optional fields);
- ``GET/POST /api/folders``, ``GET /api/folders/:uid``: folder uids are unique (409), at most 40
  characters;
- ``POST /api/dashboards/db``: ``dashboard`` with a ``title``, ``id`` null for a new dashboard,
  ``folderUid`` of an existing folder (400 otherwise), an existing uid without ``overwrite`` is
  412 ``name-exists``; every save is kept as a new version (the version history);
- ``GET /api/dashboards/uid/:uid``: ``{"dashboard": ..., "meta": {"folderUid", "url", ...}}``;
- ``POST /api/annotations`` (``text`` required, ``time``/``timeEnd`` epoch milliseconds),
  ``GET /api/annotations`` filtered by every ``tags`` parameter (AND) and ``type``,
  ``PATCH /api/annotations/:id`` (only ``text``, ``tags``, ``time``, ``timeEnd``).

Any other request is answered 404 and kept in ``unexpected``; a request that breaks the rules or
conflicts with what is stored is answered 400/401/409/412 as Grafana would and kept in
``rejected``, so a test can assert both are empty (a 404 for a missing dashboard, folder or
annotation is an answer, not a fault). This is the one stand-in of the suite; everything else
talks to real servers.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_UID_LENGTH = 40
_DASHBOARD_FIELDS = {"dashboard", "folderId", "folderUid", "message", "overwrite"}
_FOLDER_FIELDS = {"uid", "title", "parentUid", "description"}
_ANNOTATION_FIELDS = {"dashboardUID", "dashboardId", "panelId", "time", "timeEnd", "tags", "text"}
_ANNOTATION_PATCH_FIELDS = {"text", "tags", "time", "timeEnd"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, **extra}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class GrafanaStandIn:
    """``url`` is the Grafana base URL; state is inspected directly by tests."""

    token: str
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: uid -> every saved version, oldest first: {"dashboard", "folderUid", "message", "version"}
    dashboard_versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    rejected: list[tuple[Request, int, str]] = field(default_factory=list)
    unexpected: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 1
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> GrafanaStandIn:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> GrafanaStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ dispatch
    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    raw,
                )
                status, body = standin._answer(request)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Silence per-request logging."""

        return Handler

    def _answer(self, request: Request) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(request)
            try:
                if request.headers.get("authorization") != f"Bearer {self.token}":
                    raise ApiError(401, "Unauthorized")
                request.body = self._json_body(request)
                return 200, self._route(request)
            except _NotFound:
                self.unexpected.append(request)
                return 404, {"message": "Not found"}
            except ApiError as exc:
                if exc.status != 404:  # a missing dashboard or folder is an answer, not a fault
                    self.rejected.append((request, exc.status, str(exc)))
                return exc.status, exc.body

    @staticmethod
    def _json_body(request: Request) -> Any:
        if request.method in ("GET", "DELETE"):
            if request.body:
                raise ApiError(400, f"{request.method} with a body")
            return None
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise ApiError(400, "Content-Type must be application/json")
        try:
            return json.loads(request.body)
        except ValueError as exc:
            raise ApiError(400, f"bad request data: {exc}") from exc

    def _route(self, request: Request) -> Any:
        method, path = request.method, request.path
        if path == "/api/folders" and method == "GET":
            return [
                {"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()
            ]
        if path == "/api/folders" and method == "POST":
            return self._create_folder(request.body)
        if (match := re.fullmatch(r"/api/folders/([^/]+)", path)) and method == "GET":
            folder = self.folders.get(match.group(1))
            if folder is None:
                raise ApiError(404, "folder not found")
            return folder
        if path == "/api/dashboards/db" and method == "POST":
            return self._save_dashboard(request.body)
        if (match := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path)) and method == "GET":
            return self._get_dashboard(match.group(1))
        if path == "/api/annotations" and method == "POST":
            return self._add_annotation(request.body)
        if path == "/api/annotations" and method == "GET":
            return self._find_annotations(request.query)
        if (match := re.fullmatch(r"/api/annotations/(\d+)", path)) and method == "PATCH":
            return self._patch_annotation(int(match.group(1)), request.body)
        raise _NotFound

    # ------------------------------------------------------------------ folders
    def _create_folder(self, body: Any) -> dict[str, Any]:
        _check_fields(body, _FOLDER_FIELDS, "folder")
        title, uid = body.get("title"), body.get("uid")
        if not isinstance(title, str) or not title:
            raise ApiError(400, "folder title cannot be empty")
        if uid is not None and (not isinstance(uid, str) or len(uid) > MAX_UID_LENGTH):
            raise ApiError(400, "uid too long, max 40 characters")
        uid = uid or f"folder{self._next_id}"
        if uid in self.folders:
            raise ApiError(409, "a folder with the same uid already exists")
        if any(f["title"] == title for f in self.folders.values()):
            raise ApiError(409, "a folder or dashboard in the general folder with the same name")
        folder = {
            "id": self._take_id(),
            "uid": uid,
            "title": title,
            "url": f"/dashboards/f/{uid}/",
            "version": 1,
        }
        self.folders[uid] = folder
        return folder

    # ------------------------------------------------------------------ dashboards
    def _save_dashboard(self, body: Any) -> dict[str, Any]:
        _check_fields(body, _DASHBOARD_FIELDS, "dashboard save")
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict) or not isinstance(dashboard.get("title"), str):
            raise ApiError(400, "Dashboard title cannot be empty")
        uid = dashboard.get("uid")
        if not isinstance(uid, str) or not 0 < len(uid) <= MAX_UID_LENGTH:
            raise ApiError(400, "uid must be a string of at most 40 characters")
        folder_uid = body.get("folderUid")
        if folder_uid is not None and folder_uid not in self.folders:
            raise ApiError(400, "folder not found")
        for key, kind in (("overwrite", bool), ("message", str)):
            if body.get(key) is not None and not isinstance(body[key], kind):
                raise ApiError(400, f"{key} must be a {kind.__name__}")
        history = self.dashboard_versions.get(uid)
        if history and not body.get("overwrite"):
            raise ApiError(
                412, "A dashboard with the same uid already exists", status="name-exists"
            )
        if not history and dashboard.get("id") is not None:
            raise ApiError(404, "Dashboard not found")
        stored_id = history[0]["dashboard"]["id"] if history else self._take_id()
        version = len(history) + 1 if history else 1
        saved = {**copy.deepcopy(dashboard), "id": stored_id, "uid": uid, "version": version}
        entry = {
            "dashboard": saved,
            "folderUid": folder_uid,
            "message": body.get("message"),
            "version": version,
        }
        self.dashboard_versions.setdefault(uid, []).append(entry)
        return {
            "id": stored_id,
            "uid": uid,
            "url": f"/d/{uid}/{_slug(dashboard['title'])}",
            "status": "success",
            "version": version,
            "slug": _slug(dashboard["title"]),
        }

    def _get_dashboard(self, uid: str) -> dict[str, Any]:
        history = self.dashboard_versions.get(uid)
        if not history:
            raise ApiError(404, "Dashboard not found")
        latest = history[-1]
        return {
            "dashboard": copy.deepcopy(latest["dashboard"]),
            "meta": {
                "folderUid": latest["folderUid"],
                "url": f"/d/{uid}/{_slug(latest['dashboard']['title'])}",
                "version": latest["version"],
            },
        }

    # ------------------------------------------------------------------ annotations
    def _add_annotation(self, body: Any) -> dict[str, Any]:
        _check_fields(body, _ANNOTATION_FIELDS, "annotation")
        if not isinstance(body.get("text"), str) or not body["text"]:
            raise ApiError(400, "text field should not be empty")
        annotation = {"text": body["text"], **_checked_annotation_values(body)}
        annotation.setdefault("tags", [])
        annotation_id = self._take_id()
        self.annotations[annotation_id] = {"id": annotation_id, **annotation}
        return {"message": "Annotation added", "id": annotation_id}

    def _find_annotations(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        unknown = set(query) - {
            "from",
            "to",
            "limit",
            "alertId",
            "dashboardId",
            "dashboardUID",
            "panelId",
            "userId",
            "type",
            "tags",
            "matchAny",
        }
        if unknown:
            raise ApiError(400, f"unknown query parameters {sorted(unknown)}")
        if query.get("type", ["annotation"])[0] not in ("alert", "annotation"):
            raise ApiError(400, "type must be alert or annotation")
        wanted = set(query.get("tags", []))
        found = [a for a in self.annotations.values() if wanted <= set(a.get("tags", []))]
        limit = int(query.get("limit", ["100"])[0])
        return [copy.deepcopy(a) for a in sorted(found, key=lambda a: -a["id"])[:limit]]

    def _patch_annotation(self, annotation_id: int, body: Any) -> dict[str, Any]:
        _check_fields(body, _ANNOTATION_PATCH_FIELDS, "annotation patch")
        annotation = self.annotations.get(annotation_id)
        if annotation is None:
            raise ApiError(404, "Could not find annotation to update")
        if body.get("text") is not None and not isinstance(body["text"], str):
            raise ApiError(400, "text must be a string")
        annotation.update(_checked_annotation_values(body))
        if body.get("text"):
            annotation["text"] = body["text"]
        return {"message": "Annotation patched"}

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


class _NotFound(Exception):
    pass


def _check_fields(body: Any, allowed: set[str], what: str) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, f"{what}: expected a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, f"{what}: fields not in Grafana's API: {sorted(unknown)}")


def _checked_annotation_values(body: dict[str, Any]) -> dict[str, Any]:
    """The given time, timeEnd (epoch ms integers) and tags (strings); null means not given."""
    values: dict[str, Any] = {}
    for key in ("time", "timeEnd"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 10**12:
            raise ApiError(400, f"{key} must be epoch milliseconds, got {value!r}")
        values[key] = value
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "tags must be a list of strings")
        values["tags"] = list(tags)
    for key in ("panelId", "dashboardId"):
        if body.get(key) is not None and not isinstance(body[key], int):
            raise ApiError(400, f"{key} must be a number")
    return values


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
