"""The demo's real data: a slice of SMD machine-1-7 shipped in ``data/`` (see its README).

``load_demo_sample() -> DemoSample``: 3000 train rows, 600 labelled test rows, 38 features
``m00..m37``.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np

DEMO_SAMPLE_FILE = "smd-machine-1-7-sample.csv.gz"


@dataclass(frozen=True)
class DemoSample:
    """The shipped SMD machine-1-7 slice, values min-max scaled to [0, 1] by the publishers.

    Attributes:
        train: float32 ``(3000, 38)``, the last 3000 train rows (unlabelled, mostly normal).
        test: float32 ``(600, 38)``, test rows 17734..18333.
        test_labels: int ``(600,)``, 1 = anomalous minute (test rows 18109..18149).
        train_rows: int ``(3000,)``, original row index of each train row.
        test_rows: int ``(600,)``, original row index of each test row.
        feature_names: ``["m00", ..., "m37"]``, the column order of ``train`` and ``test``.
        machine: the SMD machine the rows come from.
    """

    train: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    feature_names: list[str]
    machine: str = "machine-1-7"


def load_demo_sample() -> DemoSample:
    """Read ``data/smd-machine-1-7-sample.csv.gz`` from the installed package."""
    resource = resources.files("aiops_plugin.demo") / "data" / DEMO_SAMPLE_FILE
    with gzip.open(io.BytesIO(resource.read_bytes()), "rt") as handle:
        header = handle.readline().strip().split(",")
        body = np.loadtxt(handle, delimiter=",", dtype=str, ndmin=2)
    if header[:3] != ["part", "row", "label"]:
        raise ValueError(f"{DEMO_SAMPLE_FILE}: unexpected header {header[:3]}")
    parts, rows, labels = body[:, 0], body[:, 1].astype(int), body[:, 2].astype(int)
    values = body[:, 3:].astype(np.float32)
    is_train, is_test = parts == "train", parts == "test"
    return DemoSample(
        train=values[is_train],
        test=values[is_test],
        test_labels=labels[is_test],
        train_rows=rows[is_train],
        test_rows=rows[is_test],
        feature_names=header[3:],
    )
