"""Configuration reload without a restart: what is applied, what is refused, and the running
agent reloading on SIGHUP and when its file changes (an invalid file keeps the running
configuration and says why)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aiops_plugin.agent import Agent
from aiops_plugin.config import Config
from aiops_plugin.demo.ports import free_port
from aiops_plugin.reload import ReloadRefused, restart_only_changes, stale_groups
from tests.test_agent import History, exported, history, make_config  # noqa: F401 - fixture


def _changed(config: Config, **sections: dict) -> Config:
    raw = config.model_dump(mode="json", exclude={"detectors": {"forecaster": {"horizon_steps"}}})
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return Config.model_validate(raw)


def test_restart_only_settings_and_stale_groups_are_told_apart(tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:9", tmp_path)
    assert restart_only_changes(config, _changed(config, server={"port": 1})) == ["server"]
    assert restart_only_changes(config, _changed(config, detectors={"device": "auto"})) == [
        "detectors.device"
    ]
    # the false-alarm rate and the suppression rules act after the models: nothing is stale
    assert stale_groups(config, _changed(config, calibration={"false_alarm_rate": 0.01})) == set()
    assert stale_groups(config, _changed(config, detectors={"mad": {"window": 20}})) == {"smd"}
    assert stale_groups(config, _changed(config, calibration={"tail_fraction": 0.2})) == {"smd"}


@pytest.fixture
def fitted(history: History, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    agent = Agent(
        make_config(
            history.prometheus.url,
            tmp_path,
            detectors={"device": "cpu", "mad": {"window": 30}, "pca": {"enabled": True}},
        )
    )
    agent.start_up()
    agent.fit(now=history.end)
    yield agent
    agent.store.close()


def test_a_reload_keeps_what_it_does_not_touch_and_refits_what_it_does(
    fitted: Agent,
    history: History,  # noqa: F811
) -> None:
    models = dict(fitted.models)
    # a new false-alarm rate: same models, same calibration, new threshold from the next cycle
    assert (
        fitted.apply_config(_changed(fitted.config, calibration={"false_alarm_rate": 0.01}))
        == set()
    )
    assert fitted.models == models and fitted.config.calibration.false_alarm_rate == 0.01
    fitted.infer(now=history.end)

    # pca off: its model and its series go; mad stays
    fitted.apply_config(_changed(fitted.config, detectors={"pca": {"enabled": False}}))
    assert set(fitted.models) == {("mad", "smd")}
    series = {
        s.labels["detector"] for s in exported(fitted)["aiops_model_last_fit_timestamp_seconds"]
    }
    assert series == {"mad"}
    # pca on again: the model fitted under these settings is loaded from the store, not refitted
    fitted.apply_config(_changed(fitted.config, detectors={"pca": {"enabled": True}}))
    assert set(fitted.models) == {("mad", "smd"), ("pca", "smd")}
    assert fitted.missing_models() == []

    # a new mad window: no stored model has these settings, so the group waits for its fit
    fitted.apply_config(_changed(fitted.config, detectors={"mad": {"window": 20}}))
    assert ("mad", "smd") in fitted.missing_models()
    fitted.fit(now=history.end, groups={"smd"})
    assert fitted.missing_models() == []
    assert fitted.models[("mad", "smd")].detector.window == 20


def test_a_change_that_needs_a_restart_is_refused_and_changes_nothing(fitted: Agent) -> None:
    before = fitted.config
    with pytest.raises(ReloadRefused, match="server changed, which takes effect only at a restart"):
        fitted.apply_config(_changed(fitted.config, server={"port": 1}))
    assert fitted.config is before


def test_reload_from_a_file_refuses_an_invalid_one_and_applies_a_valid_one(
    fitted: Agent, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    raw = fitted.config.model_dump(
        mode="json", exclude={"detectors": {"forecaster": {"horizon_steps"}}}
    )
    path.write_text(yaml.safe_dump({**raw, "schedule": {**raw["schedule"], "infer_every": ".nan"}}))
    assert fitted.reload(path) is False
    assert fitted.exporter.config_reload_ok._value.get() == 0
    assert fitted.config.schedule.infer_every == raw["schedule"]["infer_every"]
    path.write_text(yaml.safe_dump({**raw, "schedule": {**raw["schedule"], "infer_every": 7.0}}))
    assert fitted.reload(path) is True
    assert fitted.exporter.config_reload_ok._value.get() == 1
    assert fitted.config.schedule.infer_every == 7.0


# ------------------------------------------------------------------------ the running agent


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} on /metrics")


def _wait(check, timeout: float = 30.0) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, AssertionError):
            if check():
                return
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_the_running_agent_reloads_on_sighup_and_on_a_changed_file(tmp_path: Path) -> None:
    port = free_port()
    raw = {
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "timeout": "1s"},
        "entities": [{"name": "hosts", "labels": ["instance"], "queries": {"up": "up"}}],
        "detectors": {"device": "cpu"},
        "schedule": {"infer_every": "2s"},
        "store": {"data_dir": str(tmp_path / "data")},
        "server": {"host": "127.0.0.1", "port": port},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "aiops_plugin.cli", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait(lambda: requests.get(f"{url}/healthz", timeout=1).ok, 180)  # a loaded CI machine
        loaded = _metric(url, "aiops_config_last_reload_success_timestamp_seconds")

        # the file changes (as a ConfigMap update does): picked up without a signal
        raw["schedule"]["infer_every"] = "3s"
        path.write_text(yaml.safe_dump(raw))
        _wait(lambda: _metric(url, "aiops_config_last_reload_success_timestamp_seconds") > loaded)
        assert _metric(url, "aiops_config_last_reload_successful") == 1

        # an invalid file: refused, the agent keeps serving on the running configuration
        path.write_text(yaml.safe_dump({**raw, "schedule": {"infer_every": "-5s"}}))
        _wait(lambda: _metric(url, "aiops_config_last_reload_successful") == 0)
        assert requests.get(f"{url}/healthz", timeout=5).ok
        # fixed and signalled
        path.write_text(yaml.safe_dump(raw))
        process.send_signal(signal.SIGHUP)
        _wait(lambda: _metric(url, "aiops_config_last_reload_successful") == 1)
    except AssertionError:
        process.terminate()
        raise AssertionError(process.communicate(timeout=120)[0].decode()[-3000:]) from None
    finally:
        if process.poll() is None:
            process.terminate()
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 0, output
    assert "schedule.infer_every" in output and "not applied, the running one is kept" in output
