"""Benchmarks that print ratios measured in one run (`python -m uncurl.bench --help`)."""

import statistics
import time


def time_it(fn, repeats: int = 10, warmup: int = 3) -> dict:
    """Median and spread of `fn()` wall time in milliseconds; warm-up runs discarded."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "repeats": repeats}
