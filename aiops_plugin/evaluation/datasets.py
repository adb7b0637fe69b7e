"""Loaders for the public labelled datasets the benchmark harness scores detectors on.

Every dataset is read from the evaluation data root (``shared/data`` beside the repository; see
its ``README.md`` and each folder's ``PROVENANCE.md``) and returned as one ``LabelledSeries`` per
entity, so the harness never needs to know which dataset a series came from.

Layout expected under the data root:

- ``smd/``: Server Machine Dataset (OmniAnomaly, KDD 2019), 38 metrics, one row a minute.
  ``processed/<machine>_{train,test,test_label}.pkl`` (output of OmniAnomaly's
  ``data_preprocess.py``) and ``ServerMachineDataset/interpretation_label/<machine>.txt``
  (``start-end:d1,d2,...``, ``end`` EXCLUSIVE, ``d`` 1-based metric numbers).
- ``asd/``: Application Server Dataset (InterFusion, KDD 2021), 19 metrics, one row per 5 min.
  ``processed/omi-N_{train,test,test_label}.pkl`` and ``interpretation_label/omi-N.txt``
  (same syntax but ``end`` INCLUSIVE).
- ``nab/``: NAB v1.1, univariate; every category folder that is present (the shared copy holds
  ``realAWSCloudwatch``, 5 min median step). ``data/<category>/<name>.csv``
  (``timestamp,value``), ``labels/combined_windows.json`` (keyed ``<category>/<name>.csv``) and
  ``config/profiles.json``. A NAB entity is named ``<category>/<name>``, e.g.
  ``realKnownCause/machine_temperature_system_failure``.

API:

- ``DEFAULT_DATA_ROOT``: ``Path("../shared/data")``, relative to the working directory; a module
  attribute read at call time, so it may be reassigned. ``resolve_data_root(data_root)`` picks,
  in order, the explicit argument, the ``AIOPS_DATA_ROOT`` environment variable, this default.
- ``list_entities(dataset, data_root=None) -> list[str]``: entities whose files are present,
  sorted naturally (``machine-1-2`` before ``machine-1-10``). An SMD/ASD entity is listed when any
  of its three pickles exists, so a partial copy fails loudly in ``load`` instead of vanishing.
  A NAB file is listed when ``combined_windows.json`` has its key (NAB lists every file it
  scores, an empty list for a file without anomalies), in every category folder under ``data/``.
- ``load(dataset, entity, data_root=None) -> LabelledSeries`` and
  ``load_all(dataset, entities=None, data_root=None) -> list[LabelledSeries]``. A NAB entity may
  also be given as its bare file name when only one category holds that name, and a NAB
  category name given to ``load_all`` selects every listed file of that category.
- ``nab_full(entity, data_root=None) -> NabSeries``: the whole NAB file as
  ``(timestamps, values, labels, windows)``, as NAB's scorer needs it.
- ``nab_probation_rows(n_rows) -> int`` and ``nab_profiles(data_root=None) -> dict``.

Conventions:

- ``segments`` are ``(start, end, culprits)`` in test-row indices with ``end`` EXCLUSIVE (ASD's
  inclusive ends are shifted by one) and 0-based culprit feature indices, sorted by start.
- NAB has no train split. NAB does not score a file's probationary period, its first
  ``min(floor(0.15 * rows), 750)`` rows (``nab/util.py:getProbationPeriod``), so a detector may
  learn there: ``train`` is those rows and ``test`` the rest, with ``test_timestamps``.
  NAB's file timestamps carry no zone and are read as UTC.
- Problems with the data are handled and listed in ``LabelledSeries.notes``, never silently:
  constant features, NaN values (kept as NaN), an all-normal test set, segments that disagree
  with the row labels, duplicate or gapped NAB timestamps. A missing or malformed file, or labels
  whose length differs from the series', raises ``DatasetError`` naming the file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_DATA_ROOT = Path("../shared/data")
DATA_ROOT_ENV = "AIOPS_DATA_ROOT"
DATASETS = ("smd", "asd", "nab")

NAB_WINDOWS = Path("labels") / "combined_windows.json"
NAB_PROBATION_FRACTION = 0.15
# NAB caps the probationary period at 15 % of 5000 rows, whatever the file's length.
_NAB_PROBATION_CAP_ROWS = 5000

_STEP_SECONDS = {"smd": 60.0, "asd": 300.0}
_SEGMENT_END_INCLUSIVE = {"smd": False, "asd": True}
_INTERPRETATION_DIR = {
    "smd": Path("ServerMachineDataset") / "interpretation_label",
    "asd": Path("interpretation_label"),
}
_EXPECTED_LAYOUT = {
    "smd": (
        "the SMD pickles laid out as in OmniAnomaly's data_preprocess.py "
        "(processed/<machine>_{train,test,test_label}.pkl) and "
        "ServerMachineDataset/interpretation_label/<machine>.txt"
    ),
    "asd": (
        "the ASD pickles of InterFusion (processed/omi-N_{train,test,test_label}.pkl) "
        "and interpretation_label/omi-N.txt"
    ),
    "nab": (
        "NAB v1.1 files: data/<category>/<name>.csv (timestamp,value), "
        "labels/combined_windows.json and config/profiles.json"
    ),
}
_PICKLE_PARTS = ("train", "test", "test_label")
_PICKLE_NAME = re.compile(r"(?P<entity>.+)_(?:train|test|test_label)\.pkl")
_SEGMENT_LINE = re.compile(r"(?P<start>\d+)-(?P<end>\d+):(?P<dims>\d+(?:,\d+)*)")
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
# What a corrupt or hostile pickle can raise while loading (see the pickle module's docs).
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
)
_MAX_RUNS_SHOWN = 5

Segment = tuple[int, int, list[int]]


class DatasetError(Exception):
    """A dataset file is missing or malformed; the message names the path and what belongs there."""


@dataclass(frozen=True, eq=False)
class LabelledSeries:
    """One entity of a labelled dataset, split into the rows a detector fits on and is scored on.

    ``eq=False``: the fields are arrays, whose ``==`` is element-wise, so identity is compared.

    Attributes:
        dataset: ``"smd"``, ``"asd"`` or ``"nab"``.
        entity: e.g. ``"machine-1-2"``, ``"omi-1"``,
            ``"realAWSCloudwatch/ec2_cpu_utilization_24ae8d"``.
        train: float32 ``(train_rows, features)``; for NAB the probationary rows.
        test: float32 ``(test_rows, features)``.
        test_labels: int8 ``(test_rows,)``, 1 = anomalous row.
        step_seconds: seconds between rows (NAB: median difference of the timestamps).
        test_timestamps: float64 ``(test_rows,)`` Unix seconds for NAB; None for SMD and ASD,
            whose publishers removed the timestamps.
        feature_names: ``m00``, ``m01``, ... for SMD/ASD, whose metric names were removed;
            ``["value"]`` for NAB.
        segments: labelled anomalies ``(start, end_exclusive, culprit_feature_indices)`` in
            test-row indices, sorted by start; NAB windows have no culprits.
        notes: data issues found and how they were handled.
    """

    dataset: str
    entity: str
    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    step_seconds: float
    test_timestamps: np.ndarray | None
    feature_names: list[str]
    segments: list[Segment]
    notes: list[str]


class NabSeries(NamedTuple):
    """One whole NAB file, probationary rows included, as NAB's scorer needs it.

    Attributes:
        timestamps: float64 ``(rows,)`` Unix seconds (the file's zone-less times read as UTC).
        values: float64 ``(rows,)``; NaN where the file has no value.
        labels: int8 ``(rows,)``, 1 inside a window (bounds inclusive, as NAB labels them).
        windows: ``(start, end)`` Unix seconds of each anomaly window, in file order.
    """

    timestamps: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    windows: list[tuple[float, float]]


def resolve_data_root(data_root: Path | str | None = None) -> Path:
    """Absolute data root: the argument, else ``$AIOPS_DATA_ROOT``, else ``DEFAULT_DATA_ROOT``."""
    if data_root is not None:
        root = Path(data_root)
    elif os.environ.get(DATA_ROOT_ENV):
        root = Path(os.environ[DATA_ROOT_ENV])
    else:
        root = DEFAULT_DATA_ROOT
    return root.expanduser().resolve()


def list_entities(dataset: str, data_root: Path | str | None = None) -> list[str]:
    """Entities of ``dataset`` whose files are present, in natural order."""
    root = _dataset_dir(dataset, data_root)
    if dataset == "nab":
        return _nab_entities(root)
    folder = root / "processed"
    _require_dir(folder, dataset)
    names = {
        match["entity"]
        for path in folder.glob("*.pkl")
        if (match := _PICKLE_NAME.fullmatch(path.name))
    }
    return sorted(names, key=_natural_key)


def load(dataset: str, entity: str, data_root: Path | str | None = None) -> LabelledSeries:
    """Train rows, test rows, test labels and labelled segments of one entity."""
    root = _dataset_dir(dataset, data_root)
    if dataset == "nab":
        entity = _nab_entity(root, entity)
        return _split_nab(entity, _read_nab_file(root, entity))
    return _load_pickled(dataset, entity, root)


def load_all(
    dataset: str, entities: list[str] | None = None, data_root: Path | str | None = None
) -> list[LabelledSeries]:
    """Every entity of ``dataset`` (or the ones named), in order; an empty discovery is an error."""
    if entities is None:
        entities = list_entities(dataset, data_root)
        if not entities:
            folder = _dataset_dir(dataset, data_root)
            raise DatasetError(
                f"{folder}: no {dataset} entity found: expected {_EXPECTED_LAYOUT[dataset]}"
            )
    elif dataset == "nab":
        entities = _expand_nab_categories(_dataset_dir(dataset, data_root), entities)
    return [load(dataset, entity, data_root) for entity in entities]


def load_datasets(
    datasets: Sequence[str],
    entities: Sequence[str] | None = None,
    data_root: Path | str | None = None,
) -> list[LabelledSeries]:
    """:func:`load_all` of each dataset in turn, as every benchmark reads its input."""
    chosen = list(entities) if entities else None
    return [series for name in datasets for series in load_all(name, chosen, data_root)]


def nab_full(entity: str, data_root: Path | str | None = None) -> NabSeries:
    """The whole NAB file with its row labels and windows; NAB scores the file as one stream."""
    root = _dataset_dir("nab", data_root)
    return _read_nab_file(root, _nab_entity(root, entity))


def nab_probation_rows(n_rows: int) -> int:
    """Rows at the start of a NAB file that NAB does not score (its probationary period)."""
    return int(
        min(
            math.floor(NAB_PROBATION_FRACTION * n_rows),
            NAB_PROBATION_FRACTION * _NAB_PROBATION_CAP_ROWS,
        )
    )


def nab_profiles(data_root: Path | str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """NAB's cost matrices by profile name, e.g. ``["standard"]["CostMatrix"]["fpWeight"]``."""
    path = _dataset_dir("nab", data_root) / "config" / "profiles.json"
    profiles = _read_json(path, "nab")
    weights = ("tpWeight", "fnWeight", "fpWeight", "tnWeight")
    for name, profile in profiles.items():
        matrix = profile.get("CostMatrix") if isinstance(profile, dict) else None
        if not isinstance(matrix, dict) or not all(
            isinstance(matrix.get(weight), int | float) for weight in weights
        ):
            raise DatasetError(
                f"{path}: profile {name!r} needs a CostMatrix with numeric {', '.join(weights)}"
            )
    return profiles


def _dataset_dir(dataset: str, data_root: Path | str | None) -> Path:
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    path = resolve_data_root(data_root) / dataset
    if not path.is_dir():
        raise DatasetError(
            f"{path} not found: expected {_EXPECTED_LAYOUT[dataset]} there; pass --data-root "
            f"(or set {DATA_ROOT_ENV}) to the folder that holds smd/, asd/ and nab/"
        )
    return path


def _require_dir(path: Path, dataset: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path} not found: expected {_EXPECTED_LAYOUT[dataset]}")


def _require_file(path: Path, dataset: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{path} not found: expected {_EXPECTED_LAYOUT[dataset]}")


def _natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort key comparing all-digit name parts as numbers: ``machine-1-2`` before ``machine-1-10``.

    Only whole parts between ``-``, ``_`` and ``.`` count as numbers, so hex ids such as NAB's
    ``5f5533`` keep their plain string order.
    """
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[-_.]", name)
    ]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but numpy arrays: the pickles come from third-party repositories."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module.endswith(".multiarray"):
            module = f"{_NUMPY_CORE}.multiarray"
        return super().find_class(module, name)


def _load_array(path: Path, dataset: str) -> np.ndarray:
    _require_file(path, dataset)
    try:
        with path.open("rb") as handle:
            array = _NumpyOnlyUnpickler(handle).load()
    except _UNPICKLE_ERRORS as exc:
        raise DatasetError(f"{path}: not a pickled numpy array ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path}: expected a pickled numpy array, got {type(array).__name__}")
    return array


def _as_matrix(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 ``(rows, features)``; anything else means the wrong file."""
    if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.number):
        raise DatasetError(
            f"{path}: expected a numeric 2-D array (rows, features), "
            f"got {array.dtype} of shape {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _as_labels(raw: np.ndarray, path: Path, n_rows: int, rows_path: Path) -> np.ndarray:
    """int8 0/1 labels, one per test row."""
    if raw.ndim != 1:
        raise DatasetError(f"{path}: expected a 1-D array of 0/1 labels, got shape {raw.shape}")
    if len(raw) != n_rows:
        raise DatasetError(
            f"{path} has {len(raw)} labels but {rows_path} has {n_rows} test rows: "
            "expected one 0/1 label per test row"
        )
    invalid = ~np.isin(raw, (0, 1))
    if invalid.any():
        raise DatasetError(
            f"{path}: labels must be 0 or 1; {int(invalid.sum())} rows hold other values "
            f"such as {raw[invalid][0]!r}"
        )
    return raw.astype(np.int8)


def _read_segments(
    path: Path, *, end_inclusive: bool, n_rows: int, n_features: int
) -> list[Segment]:
    """Parse ``start-end:d1,d2,...`` lines into exclusive-end, 0-based-culprit segments."""
    segments: list[Segment] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        match = _SEGMENT_LINE.fullmatch(text)
        if match is None:
            raise DatasetError(f"{path}:{number}: {text!r} is not 'start-end:d1,d2,...'")
        start, end = int(match["start"]), int(match["end"]) + int(end_inclusive)
        culprits = [int(dim) - 1 for dim in match["dims"].split(",")]
        if not 0 <= start < end <= n_rows:
            raise DatasetError(
                f"{path}:{number}: segment {text.split(':')[0]} is not within "
                f"the {n_rows} test rows"
            )
        if not all(0 <= culprit < n_features for culprit in culprits):
            raise DatasetError(
                f"{path}:{number}: metric numbers must be within 1..{n_features}, got {text}"
            )
        segments.append((start, end, culprits))
    return sorted(segments, key=lambda segment: (segment[0], segment[1]))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` runs of True in a 1-D boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


def _format_runs(mask: np.ndarray) -> str:
    runs = _runs(mask)
    shown = ", ".join(f"[{start}, {end})" for start, end in runs[:_MAX_RUNS_SHOWN])
    return shown + (
        f" and {len(runs) - _MAX_RUNS_SHOWN} more" if len(runs) > _MAX_RUNS_SHOWN else ""
    )


def _value_notes(values: np.ndarray, part: str) -> list[str]:
    """Constant features and missing or infinite values of one split (train or test)."""
    if values.size == 0:
        return []
    notes = []
    missing = np.isnan(values)
    lowest = np.where(missing, np.inf, values).min(axis=0)
    highest = np.where(missing, -np.inf, values).max(axis=0)
    constant = np.flatnonzero(lowest == highest)
    if constant.size:
        notes.append(f"{part}: features {constant.tolist()} are constant (zero variance)")
    if missing.any():
        features = np.flatnonzero(missing.any(axis=0)).tolist()
        notes.append(f"{part}: {int(missing.sum())} NaN values in features {features}; kept as NaN")
    infinite = np.isinf(values)
    if infinite.any():
        features = np.flatnonzero(infinite.any(axis=0)).tolist()
        notes.append(f"{part}: {int(infinite.sum())} infinite values in features {features}; kept")
    return notes


def _label_notes(labels: np.ndarray) -> list[str]:
    if labels.any():
        return []
    return ["test: no anomalous row (all normal); only false alarms can be scored here"]


def _segment_label_notes(segments: list[Segment], labels: np.ndarray, source: str) -> list[str]:
    """Where the segments and the row labels disagree; the row labels stay the ground truth."""
    covered = np.zeros(len(labels), dtype=bool)
    for start, end, _ in segments:
        covered[start:end] = True
    notes = []
    uncovered = (labels == 1) & ~covered
    if uncovered.any():
        notes.append(
            f"{int(uncovered.sum())} anomalous test rows lie in no segment of {source} "
            f"(rows {_format_runs(uncovered)}); labels kept, culprits unknown there"
        )
    normal_inside = covered & (labels == 0)
    if normal_inside.any():
        notes.append(
            f"{int(normal_inside.sum())} test rows inside segments of {source} are labelled "
            f"normal (rows {_format_runs(normal_inside)}); labels kept"
        )
    return notes


def _load_pickled(dataset: str, entity: str, root: Path) -> LabelledSeries:
    """SMD or ASD: three numpy pickles plus the interpretation-label text file."""
    paths = {part: root / "processed" / f"{entity}_{part}.pkl" for part in _PICKLE_PARTS}
    segments_path = root / _INTERPRETATION_DIR[dataset] / f"{entity}.txt"
    for path in (*paths.values(), segments_path):
        _require_file(path, dataset)
    train = _as_matrix(_load_array(paths["train"], dataset), paths["train"])
    test = _as_matrix(_load_array(paths["test"], dataset), paths["test"])
    if train.shape[1] != test.shape[1]:
        raise DatasetError(
            f"{paths['train']} has {train.shape[1]} features but {paths['test']} has "
            f"{test.shape[1]}: expected the same metrics in both"
        )
    labels = _as_labels(
        _load_array(paths["test_label"], dataset), paths["test_label"], len(test), paths["test"]
    )
    segments = _read_segments(
        segments_path,
        end_inclusive=_SEGMENT_END_INCLUSIVE[dataset],
        n_rows=len(test),
        n_features=test.shape[1],
    )
    notes = [
        *_value_notes(train, "train"),
        *_value_notes(test, "test"),
        *_label_notes(labels),
        *_segment_label_notes(segments, labels, segments_path.name),
    ]
    return LabelledSeries(
        dataset=dataset,
        entity=entity,
        train=train,
        test=test,
        test_labels=labels,
        step_seconds=_STEP_SECONDS[dataset],
        test_timestamps=None,
        feature_names=[f"m{index:02d}" for index in range(test.shape[1])],
        segments=segments,
        notes=notes,
    )


def _read_json(path: Path, dataset: str) -> dict[str, Any]:
    _require_file(path, dataset)
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _parse_value(text: str, path: Path, line: int) -> float:
    """A CSV value; an empty field is a missing sample (NaN), not an error."""
    if not text.strip():
        return math.nan
    try:
        return float(text)
    except ValueError as exc:
        raise DatasetError(f"{path}:{line}: value {text!r} is not a number") from exc


def _read_nab_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps (float64 Unix seconds, zone-less times read as UTC) and float64 values."""
    _require_file(path, "nab")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["timestamp", "value"]:
            raise DatasetError(f"{path}: header is {header}, expected 'timestamp,value'")
        rows = [(line, row) for line, row in enumerate(reader, start=2) if row]
    for line, row in rows:
        if len(row) != 2:
            raise DatasetError(f"{path}:{line}: expected 2 fields (timestamp,value), got {row}")
    if len(rows) < 2:
        raise DatasetError(f"{path}: {len(rows)} data rows; a series needs at least 2")
    try:
        stamps = np.array([row[0] for _, row in rows], dtype="datetime64[s]")
    except ValueError as exc:
        raise DatasetError(f"{path}: bad timestamp ({exc}); expected YYYY-MM-DD HH:MM:SS") from exc
    values = np.array([_parse_value(row[1], path, line) for line, row in rows], dtype=np.float64)
    return stamps.astype(np.int64).astype(np.float64), values


def _nab_entities(root: Path) -> list[str]:
    """``<category>/<name>`` of every CSV under ``data/`` that the label windows list."""
    folder = root / "data"
    _require_dir(folder, "nab")
    labelled = _read_json(root / NAB_WINDOWS, "nab")
    found = [
        f"{category.name}/{path.stem}"
        for category in folder.iterdir()
        if category.is_dir()
        for path in category.glob("*.csv")
        if f"{category.name}/{path.name}" in labelled
    ]
    return sorted(found, key=lambda entity: [_natural_key(part) for part in entity.split("/")])


def _nab_entity(root: Path, entity: str) -> str:
    """``<category>/<name>`` of a NAB entity given as that or as a bare file name that only one
    category folder holds."""
    if "/" in entity:
        return entity
    folder = root / "data"
    _require_dir(folder, "nab")
    holders = sorted(path.parent.name for path in folder.glob(f"*/{entity}.csv"))
    if len(holders) == 1:
        return f"{holders[0]}/{entity}"
    if not holders:
        raise DatasetError(
            f"{folder}: no category folder holds {entity}.csv: expected {_EXPECTED_LAYOUT['nab']}"
        )
    raise DatasetError(
        f"{folder}: {entity}.csv is in several categories ({', '.join(holders)}); "
        f"name one as <category>/{entity}"
    )


def _expand_nab_categories(root: Path, names: list[str]) -> list[str]:
    """``names`` with each NAB category name replaced by the listed files of that category."""
    categories = {name for name in names if "/" not in name and (root / "data" / name).is_dir()}
    if not categories:
        return names
    listed = _nab_entities(root)
    expanded = []
    for name in names:
        if name not in categories:
            expanded.append(name)
            continue
        members = [entity for entity in listed if entity.startswith(f"{name}/")]
        if not members:
            raise DatasetError(
                f"{root / 'data' / name}: no file of category {name!r} has label windows in "
                f"{root / NAB_WINDOWS}"
            )
        expanded += members
    return expanded


def _read_nab_windows(path: Path, key: str) -> list[tuple[float, float]]:
    """Anomaly windows of one file as Unix-second pairs; an empty list is a valid answer."""
    all_windows = _read_json(path, "nab")
    if key not in all_windows:
        raise DatasetError(
            f"{path} has no entry {key!r}: expected the NAB label windows of every file under data/"
        )
    windows = []
    for window in all_windows[key]:
        try:
            start, end = (
                float(np.datetime64(stamp, "us").astype(np.int64)) / 1e6 for stamp in window
            )
        except (TypeError, ValueError) as exc:
            raise DatasetError(
                f"{path}: window {window} of {key!r} is not a [start, end] pair of timestamps"
            ) from exc
        if end < start:
            raise DatasetError(f"{path}: window {window} of {key!r} ends before it starts")
        windows.append((start, end))
    return windows


def _read_nab_file(root: Path, entity: str) -> NabSeries:
    """``entity``: ``<category>/<name>``."""
    timestamps, values = _read_nab_csv(root / "data" / f"{entity}.csv")
    windows = _read_nab_windows(root / NAB_WINDOWS, f"{entity}.csv")
    labels = np.zeros(len(timestamps), dtype=np.int8)
    for start, end in windows:
        labels[(timestamps >= start) & (timestamps <= end)] = 1
    return NabSeries(timestamps=timestamps, values=values, labels=labels, windows=windows)


def _format_time(seconds: float) -> str:
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")


def _timestamp_notes(timestamps: np.ndarray, step_seconds: float) -> list[str]:
    """Irregular sampling the detectors should know about; the rows are kept in file order."""
    steps = np.diff(timestamps)
    notes = []
    if (steps < 0).any():
        notes.append(f"{int((steps < 0).sum())} timestamp(s) go backwards; file order kept")
    if (steps == 0).any():
        notes.append(f"{int((steps == 0).sum())} duplicate timestamp(s); rows kept")
    gaps = steps > 1.5 * step_seconds
    if gaps.any():
        notes.append(
            f"{int(gaps.sum())} gap(s) longer than 1.5 steps of {step_seconds:g} s "
            f"(largest {steps.max():g} s); not filled"
        )
    return notes


def _nab_segments(full: NabSeries, probation: int) -> tuple[list[Segment], list[str]]:
    """Windows as test-row segments; windows within the probationary period are dropped."""
    segments: list[Segment] = []
    notes = []
    for start, end in full.windows:
        inside = np.flatnonzero((full.timestamps >= start) & (full.timestamps <= end))
        described = f"window {_format_time(start)} .. {_format_time(end)}"
        if inside.size == 0:
            notes.append(f"{described} holds no row; dropped")
            continue
        first, stop = int(inside[0]) - probation, int(inside[-1]) + 1 - probation
        if stop <= 0:
            notes.append(f"{described} lies in the probationary period (train); no test segment")
            continue
        if first < 0:
            notes.append(f"{described} starts in the probationary period; segment clipped to test")
            first = 0
        segments.append((first, stop, []))
    return sorted(segments, key=lambda segment: (segment[0], segment[1])), notes


def _split_nab(entity: str, full: NabSeries) -> LabelledSeries:
    """Probationary rows become ``train``, the scored rows ``test``."""
    probation = nab_probation_rows(len(full.timestamps))
    step_seconds = float(np.median(np.diff(full.timestamps)))
    test_labels = full.labels[probation:]
    segments, segment_notes = _nab_segments(full, probation)
    train = full.values[:probation, None].astype(np.float32)
    test = full.values[probation:, None].astype(np.float32)
    notes = [
        f"NAB has no train split: train = the first {probation} rows (probationary period), "
        f"test = the remaining {len(test)}",
        *_timestamp_notes(full.timestamps, step_seconds),
        *_value_notes(train, "train"),
        *_value_notes(test, "test"),
        *_label_notes(test_labels),
        *segment_notes,
        *_segment_label_notes(segments, test_labels, "labels/combined_windows.json"),
    ]
    return LabelledSeries(
        dataset="nab",
        entity=entity,
        train=train,
        test=test,
        test_labels=test_labels,
        step_seconds=step_seconds,
        test_timestamps=full.timestamps[probation:],
        feature_names=["value"],
        segments=segments,
        notes=notes,
    )
