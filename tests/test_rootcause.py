"""Root-cause ranking: constructed cases for the contract, and the Nezha loader and benchmark on
the real files in ../shared/data/nezha."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from aiops_plugin.evaluation import nezha
from aiops_plugin.evaluation.benchmark import write_markdown_section
from aiops_plugin.evaluation.datasets import DatasetError
from aiops_plugin.evaluation.rootcause_benchmark import (
    BASELINE,
    OURS,
    SECTION,
    rootcause_markdown,
    run_rootcause_benchmark,
)
from aiops_plugin.rootcause import RootCauseCandidate, joined_candidates, rank_root_causes
from aiops_plugin.windows import entity_key

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
STEP = 60.0
START = 1_700_000_000.0


def _grid(n_steps: int = 30) -> np.ndarray:
    return START + STEP * np.arange(n_steps)


def _rank(scores: np.ndarray, event_step: int, **kwargs) -> list[RootCauseCandidate]:
    """Rank rows ``pod-0, pod-1, ...`` of one group for an event at ``event_step``."""
    labels = [{"pod": f"pod-{i}"} for i in range(len(scores))]
    kwargs.setdefault("window", 900.0)
    return rank_root_causes(
        _grid(scores.shape[1]),
        scores,
        [entity_key(label) for label in labels],
        labels,
        ["pods"] * len(scores),
        event_start=START + STEP * event_step,
        **kwargs,
    )


def _pods(ranking: list[RootCauseCandidate]) -> list[str]:
    return [candidate.entity_labels["pod"] for candidate in ranking]


def test_entity_whose_anomaly_starts_earlier_ranks_first_even_when_weaker() -> None:
    scores = np.full((2, 30), 0.2)
    scores[0, 15:20] = 1.8  # the cause: earlier, weaker
    scores[1, 18:22] = 6.0  # the event's entity: later, much stronger
    ranking = _rank(scores, event_step=18)
    assert _pods(ranking) == ["pod-0", "pod-1"]
    assert ranking[0].onset_at == START + STEP * 15
    assert ranking[0].lead_seconds == 180.0
    assert ranking[1].lead_seconds == 0.0, "the event's own entity is a candidate, lead 0"


def test_strength_breaks_ties_between_equal_onsets() -> None:
    scores = np.full((3, 30), 0.1)
    scores[0, 10:14] = 2.0
    scores[1, 10:14] = 4.0
    scores[2, 10:14] = 3.0
    ranking = _rank(scores, event_step=12)
    assert _pods(ranking) == ["pod-1", "pod-2", "pod-0"]
    assert {candidate.onset_at for candidate in ranking} == {START + STEP * 10}
    assert [c.rank_score for c in ranking] == pytest.approx([4 * 3.0, 4 * 2.0, 4 * 1.0])


def test_a_lone_noisy_step_is_no_onset_but_a_strong_single_step_is() -> None:
    scores = np.full((3, 30), 0.1)
    scores[0, 8] = 1.2  # a chance crossing 10 minutes before: excess 0.2 < 1
    scores[1, 16:19] = 1.6  # sustained: 0.6 per step, CUSUM reaches 1 at the second step
    scores[2, 12] = 2.5  # one step rarer than rate**2
    ranking = _rank(scores, event_step=18)
    by_pod = {c.entity_labels["pod"]: c for c in ranking}
    assert _pods(ranking) == ["pod-2", "pod-1", "pod-0"]
    assert by_pod["pod-0"].onset_at is None and by_pod["pod-0"].lead_seconds is None
    assert by_pod["pod-1"].onset_at == START + STEP * 16
    assert by_pod["pod-2"].lead_seconds == 360.0


def test_first_step_above_threshold_is_the_onset_with_a_tiny_excess_level() -> None:
    scores = np.full((2, 30), 0.1)
    scores[0, 8] = 1.2
    scores[1, 16:19] = 1.6
    ranking = _rank(scores, event_step=18, min_excess=1e-9)
    assert _pods(ranking) == ["pod-0", "pod-1"]
    assert ranking[0].lead_seconds == 600.0


def test_cusum_restarts_between_separate_blips() -> None:
    """Two blips of 0.6 excess, well apart, are not one anomaly: the steps between pull the
    CUSUM back to 0, so neither run reaches the level."""
    scores = np.full((1, 30), 0.1)
    scores[0, 10] = 1.6
    scores[0, 15] = 1.6
    (candidate,) = _rank(scores, event_step=16)
    assert candidate.onset_at is None
    assert candidate.rank_score == pytest.approx(1.2)


def test_a_cause_flagged_one_step_after_the_event_counts_with_negative_lead() -> None:
    scores = np.full((2, 30), 0.1)
    scores[0, 20:24] = 3.0
    scores[1, 19:24] = 3.0
    ranking = _rank(scores, event_step=20)
    assert _pods(ranking) == ["pod-1", "pod-0"]
    assert ranking[0].lead_seconds == 60.0
    assert ranking[1].lead_seconds == 0.0
    late = np.full((1, 30), 0.1)
    late[0, 21:24] = 3.0
    (candidate,) = _rank(late, event_step=20)
    assert candidate.lead_seconds == -60.0, "after = one step by default"
    (candidate,) = _rank(late, event_step=20, after=0.0)
    assert candidate.onset_at is None


def test_steps_before_the_window_do_not_count() -> None:
    scores = np.full((2, 40), 0.1)
    scores[0, 2:6] = 5.0  # ends 30 minutes before the event
    scores[1, 34:37] = 2.0
    ranking = _rank(scores, event_step=35, window=900.0)
    assert _pods(ranking) == ["pod-1", "pod-0"]
    assert ranking[1].onset_at is None and ranking[1].peak_score == pytest.approx(0.1)


def test_never_anomalous_entities_follow_by_peak() -> None:
    scores = np.full((4, 30), 0.1)
    scores[0, 10:14] = 3.0
    scores[1, 12] = 0.9
    scores[2, 12] = 0.5
    scores[3, 12] = 1.3
    ranking = _rank(scores, event_step=12)
    assert _pods(ranking) == ["pod-0", "pod-3", "pod-1", "pod-2"]
    assert [c.onset_at is None for c in ranking] == [False, True, True, True]


def test_nan_steps_add_no_evidence_and_unscored_entities_are_left_out() -> None:
    scores = np.full((3, 30), 0.1)
    scores[0, 10] = 1.6
    scores[0, 11] = np.nan  # a gap inside the run neither resets nor raises the CUSUM
    scores[0, 12] = 1.6
    scores[1] = np.nan  # not scored at all
    scores[2, :] = 0.3
    scores[2, 5:8] = np.nan
    ranking = _rank(scores, event_step=12)
    assert _pods(ranking) == ["pod-0", "pod-2"]
    assert ranking[0].onset_at == START + STEP * 10
    assert ranking[0].peak_score == pytest.approx(1.6)
    assert ranking[0].rank_score == pytest.approx(1.2)
    assert np.isfinite(ranking[1].peak_score)
    assert _rank(np.full((2, 30), np.nan), event_step=12) == []


def test_top_limits_the_candidates_in_rank_order() -> None:
    scores = np.full((10, 30), 0.1)
    for row in range(10):
        scores[row, 5 + row : 15] = 2.0  # pod-0 earliest, pod-9 latest
    ranking = _rank(scores, event_step=14, top=3)
    assert _pods(ranking) == ["pod-0", "pod-1", "pod-2"]
    assert len(_rank(scores, event_step=14, top=50)) == 10


def test_as_dict_is_plain_json() -> None:
    scores = np.full((1, 30), 0.1)
    scores[0, 10:13] = 2.0
    (candidate,) = _rank(scores, event_step=11)
    data = json.loads(json.dumps(candidate.as_dict()))
    assert data == {
        "group": "pods",
        "entity_key": entity_key({"pod": "pod-0"}),
        "entity_labels": {"pod": "pod-0"},
        "onset_at": START + STEP * 10,
        "lead_seconds": 60.0,
        "peak_score": 2.0,
        "rank_score": pytest.approx(3.0),
    }


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="scores must be"):
        rank_root_causes(_grid(5), np.zeros((2, 4)), ["a", "b"], [{}, {}], ["g", "g"], START, 900)
    with pytest.raises(ValueError, match="top"):
        rank_root_causes(_grid(5), np.zeros((1, 5)), ["a"], [{}], ["g"], START, 900, top=0)


def test_joined_candidates_same_group_always_other_groups_on_equal_join_labels() -> None:
    rows = [
        {"pod": "a", "namespace": "shop"},  # event's group
        {"pod": "b", "namespace": "other"},  # event's group, other namespace: still counts
        {"instance": "n1", "namespace": "shop"},  # nodes group, same namespace
        {"instance": "n2", "namespace": "bank"},
        {"instance": "n3"},  # lacks the join label
    ]
    groups = ["pods", "pods", "nodes", "nodes", "nodes"]
    event = {"pod": "a", "namespace": "shop"}
    picked = joined_candidates(event, "pods", rows, groups, ["namespace"])
    assert picked.tolist() == [True, True, True, False, False]
    assert joined_candidates(event, "pods", rows, groups, []).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    both = joined_candidates(event, "pods", rows, groups, ["namespace", "instance"])
    assert both.tolist() == [True, True, False, False, False], "the event lacks 'instance'"


# --------------------------------------------------------------------------- Nezha, real files


@pytest.fixture(scope="module")
def data_root() -> Path:
    """The shared evaluation data; its absence is a broken checkout, so fail rather than skip."""
    if not (DATA_ROOT / "nezha").is_dir():
        pytest.fail(f"{DATA_ROOT} has no nezha/ (see shared/data/nezha/PROVENANCE.md)")
    return DATA_ROOT


def test_nezha_faults_are_the_28_of_the_fault_list_in_utc(data_root: Path) -> None:
    faults = nezha.read_faults(data_root=data_root)
    assert len(faults) == 28
    assert [f.injected_at for f in faults] == sorted(f.injected_at for f in faults)
    first, last = faults[0], faults[-1]
    assert first.injected_at == datetime(2023, 1, 29, 8, 43, 4, tzinfo=UTC).timestamp()
    assert (first.pod, first.kind) == ("ts-contacts-service-866bd68c97-xcqfx", "return")
    assert first.service == "ts-contacts-service"
    assert last.injected_at_text == "15:42:00"
    kinds = [f.kind for f in faults]
    assert (kinds.count("exception"), kinds.count("return"), kinds.count("cpu_contention")) == (
        13,
        11,
        4,
    )


def test_nezha_pod_metrics_are_46_pods_on_one_utc_minute_grid(data_root: Path) -> None:
    metrics = nezha.read_pod_metrics(data_root=data_root)
    assert len(metrics.pods) == 46 and metrics.values.shape == (46, 919, 19)
    assert metrics.features[0] == "CpuUsage(m)" and metrics.features[-1] == (
        "NodeNetworkReceiveBytes"
    )
    assert np.all(np.diff(metrics.timestamps) == 60.0)
    assert datetime.fromtimestamp(metrics.timestamps[0], UTC) == datetime(
        2023, 1, 29, 8, 41, 9, tzinfo=UTC
    )
    assert datetime.fromtimestamp(metrics.timestamps[-1], UTC) == datetime(
        2023, 1, 29, 23, 59, 9, tzinfo=UTC
    )
    assert not np.isnan(metrics.values[:, :, 0]).any(), "every pod has a row every minute"
    assert {f.pod for f in nezha.read_faults(data_root=data_root)} <= set(metrics.pods)
    assert any("PodServerLatencyP90(s)" in note and "NaN" in note for note in metrics.notes)
    windows = metrics.windows()
    assert windows.entities[0] == {"pod": metrics.pods[0]}
    assert windows.observed.sum() == np.isfinite(metrics.values).sum()


def test_nezha_pod_file_naming_another_pod_is_an_error(data_root: Path, tmp_path: Path) -> None:
    day = nezha.day_dir(data_root=data_root)
    copy = tmp_path / "nezha" / "rca_data" / nezha.DAY
    (copy / "metric").mkdir(parents=True)
    shutil.copy(day / f"{nezha.DAY}-fault_list.json", copy)
    source = next((day / "metric").glob("ts-*_metric.csv"))
    shutil.copy(source, copy / "metric" / "ts-other-service-1-2_metric.csv")
    with pytest.raises(DatasetError, match="PodName column"):
        nezha.read_pod_metrics(data_root=tmp_path)
    assert len(nezha.read_faults(data_root=tmp_path)) == 28


def test_nezha_benchmark_ranks_every_fault_and_writes_its_section(
    data_root: Path, tmp_path: Path
) -> None:
    run = run_rootcause_benchmark(data_root=data_root, false_alarm_rates=[0.001], command="cmd")
    (rate,) = run.rates
    assert len(rate.faults) == 28 and run.pods == 46
    for result in rate.faults:
        assert all(1 <= rank <= 46 for rank in result.ranks.values())
        if result.flagged_at is None:
            assert result.ranks[OURS] == 46
        else:
            assert 0 <= result.flagged_at - result.fault.injected_at <= 600
    assert rate.normal_flag_share < 0.005, "calibrated: ~0.1 % of normal pod-minutes >= 1"
    cpu = [r.ranks[BASELINE] for r in rate.faults if r.fault.kind == "cpu_contention"]
    assert max(cpu) <= 3, "a CPU fault shows in its own pod's metrics"
    text = rootcause_markdown(run)
    assert text.startswith("## Root cause on Nezha") and "Command: `cmd`" in text
    target = tmp_path / "benchmarks.md"
    target.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkept\n<!-- END other -->\n")
    write_markdown_section(target, SECTION, text)
    written = target.read_text()
    assert "kept" in written and f"<!-- BEGIN {SECTION} -->" in written
