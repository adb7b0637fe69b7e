"""The local demo and the test stack: real Prometheus, Alertmanager and agent on 127.0.0.1.

Demo and test machinery only: the agent (``agent.py``, ``api.py``, ``exporter.py``, ...) never
imports this package. Nothing here imports pytest.

- ``errors``: ``StackError`` and its subclasses (``BinaryNotFoundError`` with the apt-get line,
  ``ServerStartError`` and ``BackfillError`` with the process' output, ``WaitTimeoutError``,
  ``PortInUseError``, ``AgentExitedError``).
- ``ports``: ``free_port``, ``port_in_use``, ``process_listens_on``; ``polling``: ``poll_until``,
  the one deadline-poll loop.
- ``processes``: ``PrometheusServer``, ``AlertmanagerServer``, ``ScrapeJob``, ``find_binary``.
- ``openmetrics``: ``write_openmetrics``, ``backfill`` (promtool), ``backfill_timestamps``.
- ``sample``: ``load_demo_sample`` (the SMD slice in ``data/``).
- ``webhook``: ``WebhookReceiver``; ``replay``: ``ReplayExporter``.
- ``stack``: ``DemoStack`` / ``new_stack`` / ``demo_config``, all of the above wired together;
  ``runner``: ``run_demo``, the ``aiops-plugin demo`` command.

All wall-clock times are Unix seconds (``time.time()``), so times measured here compare directly
with Prometheus sample timestamps. History that live scrapes continue, as the end-to-end test and
the demo use it::

    sample = load_demo_sample()
    labels = {"instance": sample.machine, "job": "smd"}  # the labels the scrape will produce
    stamps = backfill_timestamps(len(sample.train), end=time.time() - 1)
    write_openmetrics(om, "smd_metric_value", labels, "dim", sample.feature_names,
                      sample.train, stamps)
    backfill(om, tsdb)
    replay = ReplayExporter(sample.test, sample.feature_names, {"instance": sample.machine})
    with PrometheusServer(tsdb, [ScrapeJob("smd", [replay.target], honor_labels=True)]) as prom:
        prom.wait_for('up{job="smd"} == 1')
        replay.start()  # row 0 is in the next scrape; no test row is skipped

The series then hold every history row 1 s apart, a seam of ~6-8 s (target discovery), then one
live sample per second; a 1 s ``query_range`` over the whole span has a point at every step.
"""

from aiops_plugin.demo.errors import (
    AgentExitedError,
    BackfillError,
    BinaryNotFoundError,
    PortInUseError,
    ServerStartError,
    StackError,
    WaitTimeoutError,
)
from aiops_plugin.demo.openmetrics import backfill, backfill_timestamps, write_openmetrics
from aiops_plugin.demo.polling import poll_until
from aiops_plugin.demo.ports import free_port, port_in_use, process_listens_on
from aiops_plugin.demo.processes import (
    AlertmanagerServer,
    PrometheusServer,
    ScrapeJob,
    find_binary,
)
from aiops_plugin.demo.replay import ReplayExporter
from aiops_plugin.demo.sample import DemoSample, load_demo_sample
from aiops_plugin.demo.stack import RULES_FILE, DemoStack, demo_config, new_stack
from aiops_plugin.demo.webhook import WebhookReceiver

__all__ = [
    "RULES_FILE",
    "AgentExitedError",
    "AlertmanagerServer",
    "BackfillError",
    "BinaryNotFoundError",
    "DemoSample",
    "DemoStack",
    "PortInUseError",
    "PrometheusServer",
    "ReplayExporter",
    "ScrapeJob",
    "ServerStartError",
    "StackError",
    "WaitTimeoutError",
    "WebhookReceiver",
    "backfill",
    "backfill_timestamps",
    "demo_config",
    "find_binary",
    "free_port",
    "load_demo_sample",
    "new_stack",
    "poll_until",
    "port_in_use",
    "process_listens_on",
    "write_openmetrics",
]
