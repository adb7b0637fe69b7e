"""The Grafana dashboards shipped in ``dashboards/`` (repository root): found, loaded, checked
for the few properties provisioning relies on, and exported for Grafana's file provisioning.

The JSON files are the source of truth (edit them in Grafana, export, commit): the Helm chart
reads the same files, ``aiops-plugin dashboards push`` uploads them (:mod:`aiops_plugin.grafana`)
and ``tests/test_dashboards.py`` checks them against Grafana's schema and a real Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``dashboards/`` beside the package: present in a source checkout and an editable install.
DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"
#: Grafana refuses dashboard uids longer than this.
MAX_UID_LENGTH = 40


class DashboardError(Exception):
    """A dashboard folder or file that cannot be used; the message names the path."""


@dataclass(frozen=True)
class DashboardFile:
    """One dashboard: where it came from and its JSON model."""

    path: Path
    model: dict[str, Any]

    @property
    def uid(self) -> str:
        return str(self.model["uid"])

    @property
    def title(self) -> str:
        return str(self.model["title"])


def load_dashboards(directory: Path | None = None) -> list[DashboardFile]:
    """Every ``*.json`` of ``directory`` (default :data:`DASHBOARDS_DIR`), sorted by file name.

    Raises DashboardError when the folder is missing or empty, a file is not a JSON object, lacks
    a ``uid`` (at most 40 characters) or ``title``, or two files share a uid: provisioning
    overwrites by uid, so a duplicate would silently replace another dashboard.
    """
    directory = directory or DASHBOARDS_DIR
    if not directory.is_dir():
        raise DashboardError(
            f"{directory}: dashboard folder not found (it ships in the repository's dashboards/; "
            "run from a source checkout or pass the folder explicitly)"
        )
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DashboardError(f"{directory}: no *.json dashboards in the folder")
    dashboards: list[DashboardFile] = []
    seen: dict[str, Path] = {}
    for path in files:
        try:
            model = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DashboardError(f"{path}: not readable as JSON: {exc}") from exc
        if not isinstance(model, dict):
            raise DashboardError(f"{path}: expected a JSON object (a dashboard model)")
        uid, title = model.get("uid"), model.get("title")
        if not isinstance(uid, str) or not 0 < len(uid) <= MAX_UID_LENGTH:
            raise DashboardError(f"{path}: 'uid' must be a string of 1-{MAX_UID_LENGTH} characters")
        if not isinstance(title, str) or not title:
            raise DashboardError(f"{path}: 'title' must be a non-empty string")
        if uid in seen:
            raise DashboardError(f"{path}: uid {uid!r} is also the uid of {seen[uid]}")
        seen[uid] = path
        dashboards.append(DashboardFile(path, model))
    return dashboards


def export_dashboards(target: Path, directory: Path | None = None) -> list[Path]:
    """Write every dashboard to ``target/<uid>.json`` for Grafana's file provisioning.

    The files are the shipped models unchanged (``id`` null, no datasource uid: each dashboard
    has a ``datasource`` variable). Returns the written paths.
    """
    dashboards = load_dashboards(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for dashboard in dashboards:
            path = target / f"{dashboard.uid}.json"
            path.write_text(json.dumps(dashboard.model, indent=2, ensure_ascii=False) + "\n")
            written.append(path)
    except OSError as exc:
        raise DashboardError(f"{target}: cannot write dashboards: {exc}") from exc
    return written
