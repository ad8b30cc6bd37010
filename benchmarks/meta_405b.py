"""A graph for a Llama-3.1-405B-shaped model, without its weights: build the model on the meta
device from its config (rg.load(..., dispatch=False)), then compile and check a graph against
it. Prints seconds and resident-memory growth for each step; last line JSON.

    python benchmarks/meta_405b.py [--repeats 10]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from transformers import LlamaConfig

import reftgraph as rg
from reftgraph.engine.plan import compile_graph

from common import PeakRSS, median_time, report

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_meta import LLAMA_405B  # noqa: E402  (the config the tests use)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    path = tempfile.mkdtemp()
    LlamaConfig(**LLAMA_405B).save_pretrained(path)
    rg.models.tiny_tokenizer().save_pretrained(path)
    with PeakRSS() as mem_load:
        t = time.perf_counter()
        lm = rg.load(path, dispatch=False)
        first_load = time.perf_counter() - t
    again = median_time(lambda: rg.load(path, dispatch=False), repeats=3, warmup=0)

    def build_and_compile():
        g = rg.reft_graph(lm, layers=[30, 60, 90, 125], positions="f5+l5", rank=4)
        g.add(rg.Site("head_out", 125, head=127, positions="last"), rg.Collect(), name="h")
        return compile_graph(g, lm.arch)

    with PeakRSS() as mem_compile:
        build_and_compile()
    compile_s = median_time(build_and_compile, repeats=args.repeats)
    report({"model": str(lm), "load_first_s": round(first_load, 3), "load_again_s": round(again, 3),
            "load_peak_rss_growth_mb": round(mem_load.growth, 1),
            "graph_build_and_compile_s": round(compile_s, 4),
            "compile_peak_rss_growth_mb": round(mem_compile.growth, 1)})


if __name__ == "__main__":
    main()
