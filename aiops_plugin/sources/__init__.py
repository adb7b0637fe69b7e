"""Metric sources: PromQL reads onto the step grid."""
