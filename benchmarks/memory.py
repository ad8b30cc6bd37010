"""Memory over long sessions: resident set size (RSS) before and after 1,000 traced forwards
(``rg.run``) and 200 training steps (``rg.train``) with a graph on a tiny Llama, and a hash of
the language model's weights before and after training (they must not change).

    python benchmarks/memory.py [--runs 1000] [--steps 200] [--family llama]

Goal: ``rss_growth_mb_trace`` and ``rss_growth_mb_train`` under 50 MB. Each phase starts
after a few warm-up calls (one-time allocations: lazy imports, allocator pools, caches),
and the growth over the second half of each phase is printed too: a leak grows linearly,
so it shows there as well as in the total.
"""

import argparse
import gc
import hashlib
import os
import sys

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))

import reftgraph as rg  # noqa: E402
from common import report  # noqa: E402

PROMPTS = ["the cat sat on the mat", "a dog", "hello world, how are you", "xyz"]
SOURCES = {"source": ["one two three four", "five", "six seven eight nine ten", "abc"]}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.hf.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def graph(lm) -> rg.Graph:
    """LoReFT on every layer, a patch from a source stream, an ablation and two collects."""
    g = rg.reft_graph(lm, layers="all", positions="f2+l2", rank=4)
    g.add(rg.Site("resid_pre", 1, positions="last"), rg.Patch("source"), name="patch")
    g.add(rg.Site("head_out", 0, head=(0, 2), positions="last"), rg.Ablate("mean"), name="ablate")
    g.add(rg.Site("mlp_out", 1, positions="all"), rg.Collect(), name="mlp")
    g.add(rg.Site("resid_post", -1, positions="last"), rg.Collect(), name="last")
    return g


def trace_phase(n: int, step) -> dict:
    for _ in range(5):
        step()
    start = rss_mb()
    for i in range(n):
        step()
        if i == n // 2 - 1:
            middle = rss_mb()
    end = rss_mb()
    print(f"trace: RSS {start:.1f} MB at the start, {middle:.1f} MB half way, {end:.1f} MB after {n} rg.run calls")
    return {"rss_start_mb_trace": round(start, 1), "rss_end_mb_trace": round(end, 1),
            "rss_growth_mb_trace": round(end - start, 1), "rss_growth_mb_trace_second_half": round(end - middle, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--family", default="llama")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = rg.models.tiny(args.family)
    g = graph(lm)
    print(f"process RSS with the tiny {args.family} loaded: {rss_mb():.1f} MB")

    def trace():
        out = g.run(lm, PROMPTS, sources=SOURCES)
        assert out["mlp"].shape[0] == len(PROMPTS)

    figures = trace_phase(args.runs, trace)

    before = weights_hash(lm)
    train_graph = rg.reft_graph(lm, layers="all", positions="f2+l2", rank=4)
    data = rg.data.PromptResponse([("ab", "cd"), ("abc", "de"), ("b", "xyz"), ("hello", "world")])

    rg.train(train_graph, lm, data, epochs=5, batch_size=4, lr=1e-3, progress=False)  # warm-up
    marks = {}

    def sample(graph, model, epoch):  # called after each epoch (= one step: 4 rows, batch 4)
        if epoch in (0, args.steps // 2 - 1, args.steps - 1):
            marks[epoch] = rss_mb()
        return {}

    rg.train(train_graph, lm, data, epochs=args.steps, batch_size=4, lr=1e-3, progress=False, eval_fn=sample)
    start, middle, end = (marks[e] for e in (0, args.steps // 2 - 1, args.steps - 1))
    print(f"train: RSS {start:.1f} MB after the first step, {middle:.1f} MB half way, {end:.1f} MB after "
          f"{args.steps} steps in one rg.train call")
    figures.update({"rss_start_mb_train": round(start, 1), "rss_end_mb_train": round(end, 1),
                    "rss_growth_mb_train": round(end - start, 1),
                    "rss_growth_mb_train_second_half": round(end - middle, 1)})
    after = weights_hash(lm)
    figures["weights_unchanged"] = before == after
    figures["weights_sha256"] = after[:16]
    print(f"model weights unchanged by training: {before == after} (sha256 {after[:16]}...)")
    assert before == after, "training changed the language model's weights"
    report(figures)


if __name__ == "__main__":
    main()
