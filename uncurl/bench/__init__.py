"""Benchmarks that print ratios measured in one run (`python -m uncurl.bench --help`)."""

import statistics
import time


def time_it(fn, repeats: int = 10, warmup: int = 3) -> dict:
    """Median and spread of `fn()` wall time in milliseconds; warm-up runs discarded."""
    return time_all({"fn": fn}, repeats, warmup)["fn"]


def time_all(fns: dict, repeats: int = 10, warmup: int = 3) -> dict[str, dict]:
    """Time several functions round-robin, so that a change in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summary(t) for name, t in times.items()}


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2],
            "repeats": len(times)}
