"""Build the small SMD sample that ships with the package as ``aiops_plugin/demo/data``.

The end-to-end test and the local demo need real server metrics with a labelled anomaly, but the
full Server Machine Dataset (OmniAnomaly, KDD 2019) is ~50 MB. This script cuts a < 1 MB slice of
machine-1-7 out of the publishers' pickles:

- ``train``: the LAST 3000 rows of ``processed/machine-1-7_train.pkl`` (history to fit on);
- ``test``: rows 17734..18333 of ``processed/machine-1-7_test.pkl`` with their labels from
  ``processed/machine-1-7_test_label.pkl``; they hold the labelled segment 18109-18150 (end
  exclusive) of ``ServerMachineDataset/interpretation_label/machine-1-7.txt`` and no other one.

Why this machine and segment: the demo fits on its history and calibrates its scores on the
later part of that history, which the detector did not train on (``aiops_plugin.calibration``).
Against that honest yardstick the anomaly must still be rare: this segment, a fault across 28 of
the 38 metrics, scores far above 1.0 with the default ``mad`` at a false-alarm rate of 0.001, and
the 335 normal test rows before it stay below 1.0. (machine-1-2's 5875-5950, used before, did not
clear a held-out calibration.)

Output: ``aiops_plugin/demo/data/smd-machine-1-7-sample.csv.gz`` with header
``part,row,label,m00,...,m37`` (``row`` is the original row index within its part; values are
min-max scaled by the publishers and written with 6 significant digits), plus ``LICENSE-SMD``.

Run once from the repository root::

    python examples/make_demo_sample.py --smd-root ../shared/data/smd
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import pickle
import shutil
from pathlib import Path

import numpy as np

MACHINE = "machine-1-7"
TRAIN_TAIL_ROWS = 3000
TEST_START, TEST_STOP = 17734, 18334
EXPECTED_SEGMENT = (18109, 18150)
OUT_DIR = Path(__file__).resolve().parent.parent / "aiops_plugin" / "demo" / "data"
SAMPLE_NAME = f"smd-{MACHINE}-sample.csv.gz"
MAX_SAMPLE_BYTES = 1_000_000

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but numpy arrays: the pickles come from a third-party repository."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if module == "numpy.core.multiarray" and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def load_array(path: Path) -> np.ndarray:
    """Load one SMD pickle as a numpy array, without executing arbitrary code."""
    with path.open("rb") as handle:
        array = _NumpyOnlyUnpickler(handle).load()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{path}: expected a numpy array, got {type(array).__name__}")
    return array


def read_segments(path: Path) -> list[tuple[int, int]]:
    """Anomaly segments ``(start, end_exclusive)`` from an SMD interpretation_label file."""
    segments = []
    for line in path.read_text().splitlines():
        if line.strip():
            start, end = line.split(":", 1)[0].split("-")
            segments.append((int(start), int(end)))
    return segments


def check_test_slice(labels: np.ndarray, segments: list[tuple[int, int]]) -> None:
    """Fail unless the test slice holds exactly the expected labelled segment."""
    inside = [(s, e) for s, e in segments if s < TEST_STOP and e > TEST_START]
    if inside != [EXPECTED_SEGMENT]:
        raise ValueError(f"test rows {TEST_START}..{TEST_STOP - 1} overlap segments {inside}")
    expected = np.zeros(TEST_STOP - TEST_START, dtype=int)
    expected[EXPECTED_SEGMENT[0] - TEST_START : EXPECTED_SEGMENT[1] - TEST_START] = 1
    sliced = labels[TEST_START:TEST_STOP].astype(int)
    if not np.array_equal(sliced, expected):
        raise ValueError("test labels disagree with the interpretation_label segment")


def write_sample(path: Path, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> None:
    """Write the gzipped CSV; ``mtime=0`` keeps the file byte-identical across runs."""
    n_features = train.shape[1]
    header = ["part", "row", "label"] + [f"m{i:02d}" for i in range(n_features)]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    train_start = train.shape[0] - TRAIN_TAIL_ROWS
    for row in range(train_start, train.shape[0]):
        writer.writerow(["train", row, 0] + [f"{v:.6g}" for v in train[row]])
    for row in range(TEST_START, TEST_STOP):
        label = int(labels[row])
        writer.writerow(["test", row, label] + [f"{v:.6g}" for v in test[row]])
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(text.getvalue().encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smd-root", type=Path, default=Path("../shared/data/smd"))
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    processed = args.smd_root / "processed"
    train = load_array(processed / f"{MACHINE}_train.pkl")
    test = load_array(processed / f"{MACHINE}_test.pkl")
    labels = load_array(processed / f"{MACHINE}_test_label.pkl")
    segments = read_segments(
        args.smd_root / "ServerMachineDataset" / "interpretation_label" / f"{MACHINE}.txt"
    )
    check_test_slice(labels, segments)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    sample_path = args.out_dir / SAMPLE_NAME
    write_sample(sample_path, train, test, labels)
    shutil.copyfile(
        args.smd_root / "ServerMachineDataset" / "LICENSE", args.out_dir / "LICENSE-SMD"
    )
    size = sample_path.stat().st_size
    if size >= MAX_SAMPLE_BYTES:
        raise SystemExit(f"{sample_path} is {size} bytes, over the {MAX_SAMPLE_BYTES} limit")
    print(f"wrote {sample_path} ({size} bytes)")


if __name__ == "__main__":
    main()
