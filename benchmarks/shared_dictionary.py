"""A per-position feature circuit saved and loaded: its nodes share one dictionary, which the
graph file stores once (format version 2, graph.json's ``shared``). Prints the size on disk
against one copy per node, and the save and load times; last line JSON.

    .venv/bin/python benchmarks/shared_dictionary.py [--positions 14] [--latents 4608]

The graph is what ``rg.features.circuit_graph`` builds for IOI prompts of 14 tokens: a
``Patch`` per position in the basis of a 576 -> 4,608 TopK dictionary (SmolLM2-135M's width;
random weights: the file's size and the times do not depend on them).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import reftgraph as rg
from common import median_time, set_threads


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=14)
    parser.add_argument("--latents", type=int, default=4608)
    args = parser.parse_args()
    set_threads()
    sae = rg.Dictionary(576, args.latents, activation="topk", k=32, seed=0)
    graph = rg.Graph()
    for p in range(args.positions):
        outside = tuple(i for i in range(args.latents) if i % args.positions != p)
        graph.add(rg.Site("resid_post", 16, positions=[p], subspace=outside), rg.Patch("corrupt", basis=sae),
                  name=f"outside_p{p}")
    root = Path(tempfile.mkdtemp())
    try:
        path = root / "circuit"
        save_s = median_time(lambda: rg.save(graph, path), repeats=3, warmup=1)
        load_s = median_time(lambda: rg.load_graph(path), repeats=3, warmup=1)
        folder = rg.files.current_folder(path)
        size = sum(f.stat().st_size for f in folder.iterdir())
        back = rg.load_graph(path)
    finally:
        shutil.rmtree(root)
    one = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    figures = {"nodes": args.positions, "file_mib": round(size / 2**20, 1),
               "one_copy_per_node_mib": round(one * args.positions / 2**20, 1),
               "save_s": round(save_s, 3), "load_s": round(load_s, 3),
               "modules_after_load": len({id(n.op.basis) for n in back.nodes}),
               "same_weights": all(torch.equal(n.op.basis.W_dec, sae.W_dec) for n in back.nodes)}
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
