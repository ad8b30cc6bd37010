"""Shared helpers for the benchmark scripts (each prints its figures and a last line of JSON)."""

import json
import statistics
import time

import torch


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each function, runs interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def report(figures: dict) -> None:
    for k, v in figures.items():
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps(figures))


def set_threads():
    torch.set_num_threads(max(1, torch.get_num_threads()))
