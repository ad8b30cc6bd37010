"""Shared helpers for the benchmark scripts (each prints its figures and a last line of JSON)."""

import ctypes
import gc
import json
import os
import statistics
import threading
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


class PeakRSS:
    """Peak resident memory (MB) while the block runs, sampled every 5 ms; ``growth`` above the
    memory in use when it starts (freed memory is first handed back to the system, so what
    earlier work left in the allocator's free lists does not hide the growth)."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):     # not glibc
            pass
        self.peak, self.stop = 0, False
        self.start = self.rss()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.growth = self.peak - self.start
