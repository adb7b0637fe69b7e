"""aiops-plugin: anomaly detection for the Prometheus, Grafana, Alertmanager and OTel stack."""

__version__ = "0.1.0"
