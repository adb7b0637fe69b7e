"""Loader for Nezha's TrainTicket pod metrics and its fault injections (one day, 2023-01-29).

Expected under the data root (see ``nezha/PROVENANCE.md``):
``nezha/rca_data/<day>/metric/<pod>_metric.csv`` (one file per pod, one row a minute; the
frontend's ``front_service.csv`` holds no pod and is not read) and
``nezha/rca_data/<day>/<day>-fault_list.json`` (faults keyed by hour).

Conventions:

- A fault's time is its ``inject_time`` read as UTC, which matches the metrics' clocks; the
  file's ``inject_timestamp`` is about 8 h off and inconsistent, so it is ignored.
- Each pod's rows carry their own ``TimeStamp`` (Unix seconds, a second or two apart between
  pods), so every row is put on one 60 s grid starting at the earliest first row: the nearest
  grid step. Grid steps a pod has no row for stay NaN; a row that lands on an occupied step or
  more than a quarter step from its grid point is a :class:`DatasetError`, never silently kept.
- Values are the CSV's metric columns as they are (``NaN`` where the file says so: a latency
  of a pod without traffic); problems found are listed in :attr:`PodMetrics.notes`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from aiops_plugin.evaluation.datasets import DatasetError, resolve_data_root
from aiops_plugin.windows import Windows

DAY = "2023-01-29"
STEP_SECONDS = 60.0
#: The pod identifying label of the replayed entity group.
POD_LABEL = "pod"
GROUP = "trainticket"
_LEADING_COLUMNS = ("Time", "TimeStamp", "PodName")
_METRIC_SUFFIX = "_metric.csv"
_INJECT_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_MAX_OFFSET_FRACTION = 0.25


@dataclass(frozen=True)
class NezhaFault:
    """One injected fault: from ``injected_at`` (Unix seconds, UTC) the pod misbehaves; the
    paper sets every fault's duration to 3 minutes."""

    injected_at: float
    pod: str
    kind: str

    @property
    def service(self) -> str:
        return service_of(self.pod)

    @property
    def injected_at_text(self) -> str:
        return datetime.fromtimestamp(self.injected_at, UTC).strftime("%H:%M:%S")


@dataclass(frozen=True, eq=False)
class PodMetrics:
    """Every pod's metrics on one grid.

    Attributes:
        timestamps: float64 ``(time,)`` grid steps, Unix seconds, ``STEP_SECONDS`` apart.
        values: float32 ``(pods, time, features)``; NaN where missing.
        pods: pod names in the order of axis 0 (sorted).
        features: metric column names in the order of axis 2, e.g. ``CpuUsage(m)``.
        notes: data issues found and how they were handled.
    """

    timestamps: np.ndarray
    values: np.ndarray
    pods: list[str]
    features: list[str]
    notes: list[str]

    def windows(self, group: str = GROUP) -> Windows:
        """The pods as one entity group identified by ``pod``, as the agent would read them."""
        return Windows(
            group=group,
            values=self.values,
            observed=~np.isnan(self.values),
            timestamps=self.timestamps,
            entities=[{POD_LABEL: pod} for pod in self.pods],
            features=list(self.features),
            step=STEP_SECONDS,
        )


def service_of(pod: str) -> str:
    """A Kubernetes Deployment pod's service: the name without its two hash suffixes
    (``ts-contacts-service-866bd68c97-xcqfx`` -> ``ts-contacts-service``)."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


def day_dir(day: str = DAY, data_root: Path | str | None = None) -> Path:
    path = resolve_data_root(data_root) / "nezha" / "rca_data" / day
    if not path.is_dir():
        raise DatasetError(
            f"{path} not found: expected Nezha's rca_data/{day}/ with metric/*_metric.csv and "
            f"{day}-fault_list.json (see --data-root)"
        )
    return path


def read_faults(day: str = DAY, data_root: Path | str | None = None) -> list[NezhaFault]:
    """The day's injected faults in time order."""
    path = day_dir(day, data_root) / f"{day}-fault_list.json"
    try:
        by_hour = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the fault list: {exc}") from exc
    faults = []
    for hour, items in by_hour.items():
        for item in items:
            try:
                at = datetime.strptime(item["inject_time"], _INJECT_TIME_FORMAT)
                faults.append(
                    NezhaFault(
                        at.replace(tzinfo=UTC).timestamp(), item["inject_pod"], item["inject_type"]
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(
                    f"{path}: hour {hour}: a fault needs inject_time "
                    f"({_INJECT_TIME_FORMAT}), inject_pod and inject_type: {exc}"
                ) from exc
    if not faults:
        raise DatasetError(f"{path}: no fault listed")
    return sorted(faults, key=lambda fault: fault.injected_at)


def read_pod_metrics(day: str = DAY, data_root: Path | str | None = None) -> PodMetrics:
    """Every ``<pod>_metric.csv`` of the day on one 60 s grid."""
    folder = day_dir(day, data_root) / "metric"
    paths = sorted(folder.glob(f"*{_METRIC_SUFFIX}"))
    if not paths:
        raise DatasetError(f"{folder}: no *{_METRIC_SUFFIX} file")
    read = [_read_pod_file(path) for path in paths]
    features = read[0][1]
    for path, (_, names, _, _) in zip(paths, read, strict=True):
        if names != features:
            raise DatasetError(f"{path}: metric columns differ from {paths[0].name}'s")
    start = min(float(times[0]) for _, _, times, _ in read)
    end = max(float(times[-1]) for _, _, times, _ in read)
    n_steps = int(round((end - start) / STEP_SECONDS)) + 1
    values = np.full((len(read), n_steps, len(features)), np.nan, dtype=np.float32)
    notes = []
    for row, (path, (pod, _, times, rows)) in enumerate(zip(paths, read, strict=True)):
        steps = np.rint((times - start) / STEP_SECONDS).astype(np.int64)
        offset = np.abs(times - (start + STEP_SECONDS * steps))
        if offset.max() > _MAX_OFFSET_FRACTION * STEP_SECONDS:
            raise DatasetError(f"{path}: a row lies {offset.max():.0f} s off the 60 s grid")
        if np.unique(steps).size != steps.size:
            raise DatasetError(f"{path}: two rows fall on one 60 s grid step")
        values[row, steps] = rows
        if steps.size < n_steps:
            notes.append(f"{pod}: {n_steps - steps.size} grid steps without a row (NaN)")
    pods = [pod for pod, _, _, _ in read]
    if len(set(pods)) != len(pods):
        raise DatasetError(f"{folder}: a pod has more than one metric file")
    with np.errstate(invalid="ignore"):
        flat = np.nanmax(values, axis=1) == np.nanmin(values, axis=1)
    for j, name in enumerate(features):
        if flat[:, j].any():
            notes.append(f"{name}: constant for {int(flat[:, j].sum())} of {len(pods)} pods")
    missing = np.isnan(values).mean(axis=(0, 1))
    notes += [
        f"{name}: {share:.1%} of values NaN (kept as missing)"
        for name, share in zip(features, missing, strict=True)
        if share > 0
    ]
    timestamps = start + STEP_SECONDS * np.arange(n_steps, dtype=np.float64)
    return PodMetrics(timestamps, values, pods, list(features), notes)


def _read_pod_file(path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """``(pod, metric names, timestamps (rows,), values (rows, metrics))`` of one file."""
    try:
        with path.open(newline="") as handle:
            table = list(csv.reader(handle))
    except OSError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    if len(table) < 2 or tuple(table[0][:3]) != _LEADING_COLUMNS:
        raise DatasetError(f"{path}: expected a header starting {','.join(_LEADING_COLUMNS)}")
    header, body = table[0], table[1:]
    pods = {line[2] for line in body}
    pod = path.name.removesuffix(_METRIC_SUFFIX)
    if pods != {pod}:
        raise DatasetError(f"{path}: PodName column {sorted(pods)[:3]} is not the file's pod")
    try:
        times = np.array([float(line[1]) for line in body])
        rows = np.array([[_number(cell) for cell in line[3:]] for line in body], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    if rows.shape[1] != len(header) - 3:
        raise DatasetError(f"{path}: rows have {rows.shape[1]} metrics, header {len(header) - 3}")
    if np.any(np.diff(times) <= 0):
        raise DatasetError(f"{path}: TimeStamp is not increasing")
    return pod, header[3:], times, rows


def _number(cell: str) -> float:
    value = float(cell)
    return value if math.isfinite(value) else math.nan
