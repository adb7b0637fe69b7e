"""What a configuration reload (SIGHUP, or the file changing) may change in a running agent.

Most settings are read where they are used, so a reload takes effect by swapping the agent's
configuration: schedules, calibration, suppression, early warning, events, fit exclusions,
feedback, Prometheus' URL and limits, the entity groups and the detectors. What a change makes
stale is dropped and rebuilt as a restart would: a group whose models or calibration no longer
match its settings is loaded from the store again (models fitted under the same settings are
found by their hash; a calibration of other settings is refitted on the stored models), or
refitted when the store has none.

A few settings shape objects built once at start (the store connection, the HTTP listener, the
shard, the log intake and miner, the Grafana writer, the compute device). A reload that changes
one of them is refused, naming them, and the running configuration is kept: applying half a
configuration would leave the agent in a state no file describes.
"""

from __future__ import annotations

from typing import Any

from aiops_plugin.config import Config

#: Settings read once at start (dotted paths into the configuration).
RESTART_ONLY = ("store", "server", "sharding", "logs", "grafana", "detectors.device")


class ReloadRefused(Exception):
    """The new configuration was not applied; the message says why and what to do."""


def _section(config: Config, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings of :data:`RESTART_ONLY` that differ between ``old`` and ``new``."""
    return [path for path in RESTART_ONLY if _section(old, path) != _section(new, path)]


def _group_state(config: Config, group: str) -> dict[str, Any]:
    """Everything a group's fitted state (models and calibration) depends on, apart from
    the model versions themselves."""
    detectors = config.detectors.enabled_names()
    return {
        "models": {name: config.model_hash(name, group) for name in detectors},
        "calibration": config.calibration_hash(group, {}),
    }


def stale_groups(old: Config, new: Config) -> set[str]:
    """Groups of ``new`` whose models or calibration ``old`` does not describe (new groups
    included)."""
    old_names = {group.name for group in old.entities}
    return {
        group.name
        for group in new.entities
        if group.name not in old_names
        or _group_state(old, group.name) != _group_state(new, group.name)
    }
