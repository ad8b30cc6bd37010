"""Time README's patching block (SmolLM2-135M, ioi(8)): the two sweeps and the path sweep.

    .venv/bin/python benchmarks/readme_patching.py

Prints each part's seconds; the last line is JSON.
"""

import json
import time

import reftgraph as rg
from reftgraph.datasets import ioi


def main() -> None:
    t0 = time.perf_counter()
    lm = rg.load("smollm2-135m-instruct")
    t1 = time.perf_counter()
    data = ioi(8)
    resid = rg.patching.sweep(lm, data, "resid_pre", layers=range(0, 30, 3), progress=False)
    t2 = time.perf_counter()
    rg.patching.heatmap(resid)
    rg.patching.sweep(lm, data, "head_out", layers=range(15, 30), progress=False)
    t3 = time.perf_counter()
    rg.patching.path_sweep(lm, data, sender_sets=[[(layer, h)] for layer in range(20, 30) for h in range(9)],
                           progress=False)
    t4 = time.perf_counter()
    figures = {"load_s": round(t1 - t0, 1), "resid_pre_sweep_s": round(t2 - t1, 1), "head_sweep_s": round(t3 - t2, 1),
               "path_sweep_s": round(t4 - t3, 1), "block_s": round(t4 - t1, 1)}
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
