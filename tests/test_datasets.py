"""The dataset loaders against the real files in ../shared/data and their PROVENANCE tables."""

from __future__ import annotations

import json
import pickle
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from aiops_plugin.evaluation import datasets
from aiops_plugin.evaluation.datasets import (
    DATA_ROOT_ENV,
    DatasetError,
    LabelledSeries,
    list_entities,
    load,
    load_all,
    nab_full,
    nab_probation_rows,
    nab_profiles,
)

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]

# smd/PROVENANCE.md: machine -> (train rows, test rows, anomalous test rows, segments).
SMD_TABLE = {
    "machine-1-2": (23694, 23694, 542, 10),
    "machine-1-3": (23702, 23703, 817, 11),
    "machine-1-4": (23706, 23707, 720, 12),
    "machine-1-5": (23705, 23706, 100, 7),
    "machine-1-6": (23688, 23689, 3708, 30),
    "machine-1-7": (23697, 23697, 2398, 13),
    "machine-1-8": (23698, 23699, 763, 20),
}
# asd/PROVENANCE.md: entity -> (anomaly % of test rows, segments); 8640 train, 4320 test rows each.
ASD_TABLE = {
    "omi-1": (10.21, 7),
    "omi-2": (1.27, 4),
    "omi-3": (3.38, 6),
    "omi-4": (3.50, 5),
    "omi-5": (1.71, 6),
    "omi-6": (4.58, 10),
}
# nab/PROVENANCE.md: the one category in shared/data; rows per file, 4032 unless listed.
AWS = "realAWSCloudwatch"
NAB_ROWS = {
    f"{AWS}/ec2_disk_write_bytes_1ef3de": 4730,
    f"{AWS}/ec2_network_in_5abac7": 4730,
    f"{AWS}/grok_asg_anomaly": 4621,
    f"{AWS}/iio_us-east-1_i-a2eb1cd9_NetworkIn": 1243,
}


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared evaluation data; its absence is a broken checkout, so fail rather than skip."""
    if not (DATA_ROOT / "smd").is_dir():
        pytest.fail(
            f"{DATA_ROOT} has no smd/: these tests read the real SMD, ASD and NAB files in "
            "shared/data beside the repository (see shared/data/README.md)"
        )
    return DATA_ROOT


@pytest.fixture(scope="session")
def smd(data_root: Path) -> dict[str, LabelledSeries]:
    return {series.entity: series for series in load_all("smd", data_root=data_root)}


@pytest.fixture(scope="session")
def asd(data_root: Path) -> dict[str, LabelledSeries]:
    return {series.entity: series for series in load_all("asd", data_root=data_root)}


@pytest.fixture(scope="session")
def nab(data_root: Path) -> dict[str, LabelledSeries]:
    return {series.entity: series for series in load_all("nab", data_root=data_root)}


def segment_mask(series: LabelledSeries) -> np.ndarray:
    """Test rows covered by at least one labelled segment."""
    mask = np.zeros(len(series.test_labels), dtype=bool)
    for start, end, _ in series.segments:
        mask[start:end] = True
    return mask


def copy_entity(data_root: Path, target: Path, dataset: str, entity: str) -> None:
    """Copy one SMD/ASD entity's pickles and interpretation file into another data root."""
    interpretation = {
        "smd": Path("ServerMachineDataset") / "interpretation_label",
        "asd": Path("interpretation_label"),
    }[dataset]
    (target / dataset / "processed").mkdir(parents=True, exist_ok=True)
    (target / dataset / interpretation).mkdir(parents=True, exist_ok=True)
    for part in ("train", "test", "test_label"):
        name = Path("processed") / f"{entity}_{part}.pkl"
        shutil.copy(data_root / dataset / name, target / dataset / name)
    name = interpretation / f"{entity}.txt"
    shutil.copy(data_root / dataset / name, target / dataset / name)


def test_smd_entities_are_the_seven_developer_machines(data_root: Path) -> None:
    assert list_entities("smd", data_root) == list(SMD_TABLE)


@pytest.mark.parametrize("machine", list(SMD_TABLE))
def test_smd_rows_labels_and_segments_match_provenance(
    smd: dict[str, LabelledSeries], machine: str
) -> None:
    train_rows, test_rows, anomalies, n_segments = SMD_TABLE[machine]
    series = smd[machine]
    assert series.train.shape == (train_rows, 38) and series.train.dtype == np.float32
    assert series.test.shape == (test_rows, 38) and series.test.dtype == np.float32
    assert series.test_labels.shape == (test_rows,) and series.test_labels.dtype == np.int8
    assert int(series.test_labels.sum()) == anomalies
    assert len(series.segments) == n_segments
    assert series.step_seconds == 60.0
    assert series.test_timestamps is None
    assert series.feature_names == [f"m{index:02d}" for index in range(38)]


def test_smd_anomaly_ratio_over_all_machines_is_5_45_percent(
    smd: dict[str, LabelledSeries],
) -> None:
    anomalies = sum(int(series.test_labels.sum()) for series in smd.values())
    rows = sum(len(series.test_labels) for series in smd.values())
    assert (anomalies, rows) == (9048, 165895)
    assert round(100 * anomalies / rows, 2) == 5.45


def test_smd_label_pickles_equal_the_original_label_text(
    smd: dict[str, LabelledSeries], data_root: Path
) -> None:
    for machine, series in smd.items():
        text = data_root / "smd" / "ServerMachineDataset" / "test_label" / f"{machine}.txt"
        np.testing.assert_array_equal(series.test_labels, np.loadtxt(text, dtype=np.int8))


def test_smd_segments_use_exclusive_ends_and_zero_based_culprits(
    smd: dict[str, LabelledSeries],
) -> None:
    # First line of machine-1-2.txt: "4629-4688:9,10,11,13,15,18".
    assert smd["machine-1-2"].segments[0] == (4629, 4688, [8, 9, 10, 12, 14, 17])
    assert smd["machine-1-2"].test_labels[4687] == 1
    assert smd["machine-1-2"].test_labels[4688] == 0


def test_smd_segments_agree_with_labels_except_the_known_machine_1_3_gaps(
    smd: dict[str, LabelledSeries],
) -> None:
    for machine, series in smd.items():
        covered = segment_mask(series)
        assert series.test_labels[covered].all(), f"{machine}: a segment row is labelled normal"
        labelled_outside = np.flatnonzero((series.test_labels == 1) & ~covered)
        if machine != "machine-1-3":
            assert labelled_outside.size == 0, machine
            continue
        # The published machine-1-3 files disagree in two places (OmniAnomaly's
        # interpretation_label has 11 lines for 12 labelled runs): the 11-row anomaly at test rows
        # 18460..18470 has no interpretation line at all, and the last line "22923-23019" stops
        # one row short of the labelled run 22923..23019 (that line alone reads as inclusive).
        # The row labels stay the ground truth; the loader reports the 12 rows in `notes`.
        assert labelled_outside.tolist() == [*range(18460, 18471), 23019]
        assert any("12 anomalous test rows lie in no segment" in note for note in series.notes)


def test_smd_constant_features_are_reported(smd: dict[str, LabelledSeries]) -> None:
    assert "train: features [7, 26, 28, 36, 37] are constant (zero variance)" in (
        smd["machine-1-2"].notes
    )


def test_asd_entities_are_omi_1_to_6(data_root: Path) -> None:
    assert list_entities("asd", data_root) == list(ASD_TABLE)


@pytest.mark.parametrize("entity", list(ASD_TABLE))
def test_asd_rows_anomaly_share_and_segments_match_provenance(
    asd: dict[str, LabelledSeries], entity: str
) -> None:
    percent, n_segments = ASD_TABLE[entity]
    series = asd[entity]
    assert series.train.shape == (8640, 19) and series.test.shape == (4320, 19)
    assert series.test_labels.dtype == np.int8
    assert round(100 * float(series.test_labels.mean()), 2) == percent
    assert len(series.segments) == n_segments
    assert series.step_seconds == 300.0


def test_asd_anomaly_ratio_over_all_entities_is_4_11_percent(
    asd: dict[str, LabelledSeries],
) -> None:
    anomalies = sum(int(series.test_labels.sum()) for series in asd.values())
    assert round(100 * anomalies / (6 * 4320), 2) == 4.11


def test_asd_inclusive_segment_ends_are_made_exclusive(asd: dict[str, LabelledSeries]) -> None:
    # First line of omi-1.txt: "760-765:4,5,7,...,19" with 765 the last anomalous row.
    start, end, culprits = asd["omi-1"].segments[0]
    assert (start, end) == (760, 766)
    assert culprits == [3, 4, *range(6, 19)]


def test_asd_segments_cover_exactly_the_labelled_rows(asd: dict[str, LabelledSeries]) -> None:
    for entity, series in asd.items():
        np.testing.assert_array_equal(segment_mask(series), series.test_labels == 1, entity)
        assert not any("segment" in note for note in series.notes), entity


def test_nab_has_17_files_with_the_provenance_row_counts(
    nab: dict[str, LabelledSeries], data_root: Path
) -> None:
    assert list(nab) == list_entities("nab", data_root)
    assert len(nab) == 17
    rows = {entity: len(s.train) + len(s.test) for entity, s in nab.items()}
    assert rows == {entity: NAB_ROWS.get(entity, 4032) for entity in nab}
    assert sum(rows.values()) == 67740


def test_nab_windows_cover_9_32_percent_of_rows(
    nab: dict[str, LabelledSeries], data_root: Path
) -> None:
    files = [nab_full(entity, data_root) for entity in nab]
    assert sum(len(file.windows) for file in files) == 30
    in_windows = sum(int(file.labels.sum()) for file in files)
    assert round(100 * in_windows / 67740, 2) == 9.32


def test_nab_train_is_the_probationary_15_percent(
    nab: dict[str, LabelledSeries], data_root: Path
) -> None:
    series = nab[f"{AWS}/ec2_cpu_utilization_24ae8d"]
    assert nab_probation_rows(4032) == 604 and nab_probation_rows(10_000) == 750
    assert series.train.shape == (604, 1) and series.test.shape == (3428, 1)
    assert series.train.dtype == np.float32 and series.feature_names == ["value"]
    assert series.step_seconds == 300.0
    full = nab_full(f"{AWS}/ec2_cpu_utilization_24ae8d", data_root)
    assert full.timestamps[0] == datetime(2014, 2, 14, 14, 30, tzinfo=UTC).timestamp()
    assert series.test_timestamps is not None
    np.testing.assert_array_equal(series.test_timestamps, full.timestamps[604:])
    np.testing.assert_array_equal(series.test[:, 0], full.values[604:].astype(np.float32))


def test_nab_segments_are_the_windows_in_test_rows(nab: dict[str, LabelledSeries]) -> None:
    assert sum(len(series.segments) for series in nab.values()) == 30
    for entity, series in nab.items():
        np.testing.assert_array_equal(segment_mask(series), series.test_labels == 1, entity)
        assert all(culprits == [] for _, _, culprits in series.segments)
    # Window ["2014-02-26 13:45", "2014-02-27 06:25"] = file rows 3447..3647 (bounds inclusive).
    assert nab[f"{AWS}/ec2_cpu_utilization_24ae8d"].segments[0] == (3447 - 604, 3648 - 604, [])


def test_nab_file_without_window_is_all_normal_and_noted(
    nab: dict[str, LabelledSeries], data_root: Path
) -> None:
    series = nab[f"{AWS}/ec2_cpu_utilization_c6585a"]
    assert series.segments == [] and not series.test_labels.any()
    assert nab_full(f"{AWS}/ec2_cpu_utilization_c6585a", data_root).windows == []
    assert any("all normal" in note for note in series.notes)


def test_nab_duplicate_timestamps_are_noted(nab: dict[str, LabelledSeries]) -> None:
    assert "11 duplicate timestamp(s); rows kept" in nab[f"{AWS}/ec2_disk_write_bytes_1ef3de"].notes


def test_nab_profiles_hold_the_three_cost_matrices(data_root: Path) -> None:
    profiles = nab_profiles(data_root)
    assert {name: p["CostMatrix"]["fpWeight"] for name, p in profiles.items()} == {
        "standard": 0.11,
        "reward_low_FP_rate": 0.22,
        "reward_low_FN_rate": 0.11,
    }
    assert profiles["reward_low_FN_rate"]["CostMatrix"]["fnWeight"] == 2.0


def test_missing_dataset_folder_names_the_path_and_the_flag(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--data-root") as raised:
        load("smd", "machine-1-2", data_root=tmp_path)
    assert str(tmp_path / "smd") in str(raised.value)
    assert "processed/<machine>_{train,test,test_label}.pkl" in str(raised.value)


def test_data_root_argument_wins_over_environment_then_default(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert list_entities("asd", data_root) == list(ASD_TABLE)
    with pytest.raises(DatasetError, match=str(tmp_path / "asd")):
        list_entities("asd")
    monkeypatch.setenv(DATA_ROOT_ENV, str(data_root))
    assert list_entities("asd") == list(ASD_TABLE)
    monkeypatch.delenv(DATA_ROOT_ENV)
    monkeypatch.chdir(REPO_ROOT)  # the default, ../shared/data, is relative to the repository
    assert list_entities("asd") == list(ASD_TABLE)
    monkeypatch.setattr(datasets, "DEFAULT_DATA_ROOT", tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path / "asd")):
        list_entities("asd")


def test_labels_of_another_length_name_both_lengths_and_the_file(
    smd: dict[str, LabelledSeries], data_root: Path, tmp_path: Path
) -> None:
    copy_entity(data_root, tmp_path, "smd", "machine-1-5")
    label_path = tmp_path / "smd" / "processed" / "machine-1-5_test_label.pkl"
    truncated = smd["machine-1-5"].test_labels[:-10].astype(np.float32)
    label_path.write_bytes(pickle.dumps(truncated))
    with pytest.raises(DatasetError) as raised:
        load("smd", "machine-1-5", data_root=tmp_path)
    message = str(raised.value)
    assert str(label_path) in message and "23696 labels" in message and "23706 test rows" in message


def test_pickle_with_a_non_numpy_global_is_refused(data_root: Path, tmp_path: Path) -> None:
    copy_entity(data_root, tmp_path, "asd", "omi-2")
    label_path = tmp_path / "asd" / "processed" / "omi-2_test_label.pkl"
    label_path.write_bytes(pickle.dumps(Path("not-an-array")))
    with pytest.raises(DatasetError, match="refusing global pathlib"):
        load("asd", "omi-2", data_root=tmp_path)


def test_entities_are_discovered_from_a_partial_copy(data_root: Path, tmp_path: Path) -> None:
    copy_entity(data_root, tmp_path, "smd", "machine-1-5")
    # Only the label pickle of a "machine-1-10": listed (after 1-5, naturally), fails on load.
    shutil.copy(
        data_root / "smd" / "processed" / "machine-1-2_test_label.pkl",
        tmp_path / "smd" / "processed" / "machine-1-10_test_label.pkl",
    )
    assert list_entities("smd", tmp_path) == ["machine-1-5", "machine-1-10"]
    copied = load("smd", "machine-1-5", data_root=tmp_path)
    assert copied.test.shape == (23706, 38) and int(copied.test_labels.sum()) == 100
    with pytest.raises(DatasetError, match=r"machine-1-10_train\.pkl not found: expected the SMD"):
        load_all("smd", data_root=tmp_path)


def test_nab_missing_value_is_kept_as_nan_and_noted(data_root: Path, tmp_path: Path) -> None:
    entity = "ec2_cpu_utilization_77c1ca"
    shutil.copytree(data_root / "nab" / "labels", tmp_path / "nab" / "labels")
    csv_dir = tmp_path / "nab" / "data" / "realAWSCloudwatch"
    csv_dir.mkdir(parents=True)
    lines = (data_root / "nab" / "data" / "realAWSCloudwatch" / f"{entity}.csv").read_text()
    lines = lines.splitlines()
    lines[1001] = lines[1001].split(",")[0] + ","  # file row 1000 (0-based), a test row
    (csv_dir / f"{entity}.csv").write_text("\n".join(lines) + "\n")
    assert list_entities("nab", tmp_path) == [f"{AWS}/{entity}"]
    series = load("nab", entity, data_root=tmp_path)
    assert series.entity == f"{AWS}/{entity}", "a bare file name is resolved to its category"
    assert np.isnan(series.test[1000 - 604, 0]) and np.isnan(series.test).sum() == 1
    assert "test: 1 NaN values in features [0]; kept as NaN" in series.notes


def test_nab_file_missing_from_the_windows_is_an_error(data_root: Path, tmp_path: Path) -> None:
    entity = "grok_asg_anomaly"
    csv_dir = tmp_path / "nab" / "data" / "realAWSCloudwatch"
    csv_dir.mkdir(parents=True)
    shutil.copy(data_root / "nab" / "data" / "realAWSCloudwatch" / f"{entity}.csv", csv_dir)
    (tmp_path / "nab" / "labels").mkdir()
    (tmp_path / "nab" / "labels" / "combined_windows.json").write_text(json.dumps({}))
    with pytest.raises(DatasetError, match=f"no entry 'realAWSCloudwatch/{entity}.csv'"):
        load("nab", entity, data_root=tmp_path)


def test_every_labelled_nab_category_is_read_and_selectable(
    data_root: Path, tmp_path: Path
) -> None:
    """A NAB copy with a second category (NAB's own layout: data/<category>/<name>.csv, label
    keys "<category>/<name>.csv"); here a real file with its real windows, filed under both."""
    nab = tmp_path / "nab"
    shutil.copytree(data_root / "nab" / "config", nab / "config")
    real = json.loads((data_root / "nab" / "labels" / "combined_windows.json").read_text())
    kept, other = "ec2_cpu_utilization_24ae8d", "realKnownCause"
    windows = {}
    for category, names in ((AWS, [kept, "grok_asg_anomaly"]), (other, [kept])):
        (nab / "data" / category).mkdir(parents=True)
        for name in names:
            shutil.copy(data_root / "nab" / "data" / AWS / f"{name}.csv", nab / "data" / category)
            windows[f"{category}/{name}.csv"] = real[f"{AWS}/{name}.csv"]
    (nab / "data" / "unlabelled").mkdir()
    shutil.copy(data_root / "nab" / "data" / AWS / f"{kept}.csv", nab / "data" / "unlabelled")
    (nab / "labels").mkdir()
    (nab / "labels" / "combined_windows.json").write_text(json.dumps(windows))

    everything = [f"{AWS}/{kept}", f"{AWS}/grok_asg_anomaly", f"{other}/{kept}"]
    assert list_entities("nab", tmp_path) == everything
    assert [series.entity for series in load_all("nab", data_root=tmp_path)] == everything
    chosen = load_all("nab", [f"{other}/{kept}"], data_root=tmp_path)
    assert [series.entity for series in chosen] == [f"{other}/{kept}"]
    np.testing.assert_array_equal(chosen[0].test, load("nab", f"{AWS}/{kept}", tmp_path).test)
    assert chosen[0].segments == load("nab", f"{AWS}/{kept}", tmp_path).segments != []
    assert [s.entity for s in load_all("nab", [other], data_root=tmp_path)] == [f"{other}/{kept}"]
    assert (
        nab_full(f"{other}/{kept}", tmp_path).windows == nab_full(f"{AWS}/{kept}", tmp_path).windows
    )
    assert load("nab", "grok_asg_anomaly", tmp_path).entity == f"{AWS}/grok_asg_anomaly"
    with pytest.raises(DatasetError, match=f"{kept}.csv is in several categories"):
        load("nab", kept, data_root=tmp_path)
    with pytest.raises(DatasetError, match="no file of category 'unlabelled' has label windows"):
        load_all("nab", ["unlabelled"], data_root=tmp_path)
