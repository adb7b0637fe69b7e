"""Anomaly detectors behind one interface (:mod:`aiops_plugin.detectors.base`)."""
