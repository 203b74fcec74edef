"""Wall-clock timing: one stopwatch and one summary of repeated runs, for every measurement."""

import statistics
import time
from contextlib import contextmanager


@contextmanager
def stopwatch(totals: dict, name: str):
    """Add the seconds the block takes to `totals[name]` (0 if absent); objects with attributes
    work too, through `totals` being a `vars()` dict."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0


def quartiles_ms(seconds: list[float]) -> dict:
    """Median and quartiles, in milliseconds, of times given in seconds."""
    ms = sorted(1e3 * t for t in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else ms * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "repeats": len(ms)}


def time_all(fns: dict, repeats: int = 10, warmup: int = 3) -> dict[str, dict]:
    """Time several functions round-robin, so that a change in machine load hits all alike;
    warm-up runs are discarded. Per function: `quartiles_ms` of its runs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: quartiles_ms(s) for name, s in seconds.items()}


def time_it(fn, repeats: int = 10, warmup: int = 3) -> dict:
    """`time_all` of one function."""
    return time_all({"fn": fn}, repeats, warmup)["fn"]
