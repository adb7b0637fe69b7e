"""History for Prometheus: OpenMetrics text written from an array, turned into TSDB blocks.

- ``backfill_timestamps(n_rows, end, step=1.0) -> np.ndarray``: time-compressed timestamps, row
  ``i`` at ``end - (n_rows - 1 - i) * step`` seconds.
- ``write_openmetrics(path, metric, labels, feature_label, feature_names, values, timestamps)``:
  OpenMetrics text for ``promtool tsdb create-blocks-from openmetrics``.
- ``write_openmetrics_fleet(path, metric, entities, feature_label, feature_names, values_of,
  timestamps)``: the same for many entities in one family, one entity's values at a time.
- ``backfill(openmetrics_path, tsdb_dir)``: runs promtool; call it before Prometheus starts.

Facts these are built around (checked against Prometheus 2.42):

- promtool reads OpenMetrics timestamps as seconds (milliseconds silently become dates far in the
  future) and silently drops a sample older than the previous one of its series, so
  ``write_openmetrics`` refuses both.
- Prometheus loads blocks at startup, and then rejects every sample older than its newest block's
  end. So: backfill, then start Prometheus, and end the history at or before now; history ending
  in the future stalls all ingestion until then.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from aiops_plugin.demo.errors import BackfillError
from aiops_plugin.demo.processes import find_binary

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def backfill_timestamps(n_rows: int, end: float, step: float = 1.0) -> np.ndarray:
    """Time-compressed timestamps ``(n_rows,)``, seconds: row ``i`` at ``end - (n-1-i)*step``.

    SMD rows are one minute apart; replaying them one per ``step`` seconds lets a test cover
    hours of history in minutes while keeping the rows' order and spacing uniform.
    """
    return end - step * np.arange(n_rows - 1, -1, -1, dtype=np.float64)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_openmetrics(
    path: str | Path,
    metric: str,
    labels: Mapping[str, str],
    feature_label: str,
    feature_names: Sequence[str],
    values: np.ndarray,
    timestamps: np.ndarray,
) -> None:
    """Write one gauge family as OpenMetrics text for ``promtool tsdb create-blocks-from``.

    One series per feature: ``metric{labels, feature_label="<feature>"} value timestamp``.
    Series are written one after another, each in time order: promtool appends samples in file
    order and silently drops one older than its series' previous sample. NaN values are skipped
    (a missing sample, not a NaN sample).

    Args:
        path: output file.
        metric: metric name, e.g. ``smd_metric_value``.
        labels: labels shared by all series. To continue these series by live scraping, give
            exactly the labels the scrape will produce (including ``job``).
        feature_label: label that names the feature, e.g. ``dim``.
        feature_names: one name per column of ``values``.
        values: ``(time, features)``.
        timestamps: ``(time,)`` Unix seconds, strictly increasing.
    """
    write_openmetrics_fleet(
        path, metric, [labels], feature_label, feature_names, lambda _: values, timestamps
    )


def write_openmetrics_fleet(
    path: str | Path,
    metric: str,
    entities: Sequence[Mapping[str, str]],
    feature_label: str,
    feature_names: Sequence[str],
    values_of: Callable[[int], np.ndarray],
    timestamps: np.ndarray,
) -> None:
    """:func:`write_openmetrics` for many entities in one family: entity ``i`` has the labels
    ``entities[i]`` and the ``(time, features)`` values ``values_of(i)``, asked for one entity
    at a time so a large fleet is never held in memory at once."""
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if not _METRIC_NAME.match(metric):
        raise ValueError(f"invalid metric name {metric!r}")
    for labels in entities:
        for name in [*labels, feature_label]:
            if not _LABEL_NAME.match(name):
                raise ValueError(f"invalid label name {name!r}")
        if feature_label in labels:
            raise ValueError(f"feature label {feature_label!r} is also in labels")
    if timestamps.size > 1 and not np.all(np.diff(timestamps) > 0):
        raise ValueError("timestamps must be strictly increasing (promtool drops the others)")
    if timestamps.size and timestamps.max() > 1e11:
        raise ValueError("timestamps look like milliseconds; promtool expects Unix seconds")
    stamps = [f"{t:.3f}" for t in timestamps]
    with Path(path).open("w", encoding="utf-8") as out:
        out.write(f"# TYPE {metric} gauge\n")
        for index, labels in enumerate(entities):
            values = np.asarray(values_of(index), dtype=np.float64)
            if values.ndim != 2 or values.shape != (timestamps.shape[0], len(feature_names)):
                raise ValueError(
                    f"values {values.shape} must be (len(timestamps)={timestamps.shape[0]}, "
                    f"len(feature_names)={len(feature_names)})"
                )
            shared = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels.items())
            for column, feature in enumerate(feature_names):
                feature_pair = f'{feature_label}="{_escape_label_value(feature)}"'
                series = f"{metric}{{{','.join(filter(None, [shared, feature_pair]))}}}"
                out.writelines(
                    f"{series} {value!r} {stamp}\n"
                    for value, stamp in zip(values[:, column].tolist(), stamps, strict=True)
                    if not math.isnan(value)
                )
        out.write("# EOF\n")


def backfill(openmetrics_path: str | Path, tsdb_dir: str | Path) -> None:
    """Turn an OpenMetrics file into TSDB blocks in ``tsdb_dir`` (before Prometheus starts).

    Prometheus only loads blocks at startup and, once running, rejects samples older than its
    newest block's end, so history must be written here first and must not end in the future.
    """
    promtool = find_binary("promtool")
    Path(tsdb_dir).mkdir(parents=True, exist_ok=True)
    command = [promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet"]
    done = subprocess.run(
        [*command, str(openmetrics_path), str(tsdb_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stderr + done.stdout).strip()[-4000:]
        raise BackfillError(
            f"promtool backfill of {openmetrics_path} into {tsdb_dir} failed "
            f"(exit {done.returncode}):\n{output}"
        )
