"""Logs: OTLP intake, Drain3 template mining, template embeddings and log features."""
