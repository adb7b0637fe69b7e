"""aiops-plugin: anomaly detection for the Prometheus / Grafana / Alertmanager / OpenTelemetry stack."""

__version__ = "0.1.0"
