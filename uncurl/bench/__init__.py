"""Benchmarks that print ratios measured in one run (`python -m uncurl.bench --help`)."""
