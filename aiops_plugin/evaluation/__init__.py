"""Offline evaluation on public labelled datasets: loaders, metrics, the benchmark harness."""
