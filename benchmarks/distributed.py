"""Training throughput on 1 and 2 processes (torchrun, gloo on CPU) for the same total work, and
the cost of the gradient all-reduce. SmolLM2-135M, LoReFT on 4 layers (f5+l5, rank 4), the
demo's capitals data: 64 examples, global batch 8, 2 epochs.

    python benchmarks/distributed.py [--repeats 2] [--examples 64] [--epochs 2]

Each configuration runs ``--repeats`` times, alternating (1, 2, 1, 2, ...); figures are medians.
The cores are shared: 1 process uses every core's thread, N processes one share each.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report


def child(out: Path, examples: int, epochs: int) -> None:
    import torch

    import reftgraph as rg
    from reftgraph import datasets
    from reftgraph.training import distributed, loop

    rank, size = distributed.init()
    lm = rg.load()
    g = rg.reft_graph(lm, layers=[4, 10, 16, 22], positions="f5+l5", rank=4)
    pairs, _ = datasets.caps()
    data = rg.data.PromptResponse(pairs[:examples], template="chat")
    spent, waited = [], []
    summed = loop.sum_gradients

    def timed(params):   # where the loop sums gradients: the wait for the slower process, then the all-reduce
        t = time.perf_counter()
        distributed.barrier()
        waited.append(time.perf_counter() - t)
        t = time.perf_counter()
        summed(params)
        spent.append(time.perf_counter() - t)
    loop.sum_gradients = timed
    distributed.barrier()
    t = time.perf_counter()
    history = rg.train(g, lm, data, epochs=epochs, batch_size=8, lr=2e-3, seed=0, progress=False)
    seconds = time.perf_counter() - t
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "processes": size, "threads": torch.get_num_threads(), "seconds": seconds,
            "steps": len(history), "examples_per_s": examples * epochs / seconds,
            "allreduce_s_per_step": statistics.mean(spent), "wait_s_per_step": statistics.mean(waited),
            "parameters": sum(p.numel() for p in g.parameters()), "final_loss": float(history["loss"].iloc[-1])}))


def launch(n: int, args) -> dict:
    out = Path(tempfile.mkdtemp())
    threads = max(1, (os.cpu_count() or 2) // n)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
           "--child", str(out), "--examples", str(args.examples), "--epochs", str(args.epochs)]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return json.loads((out / "result.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child), args.examples, args.epochs)
    runs = {1: [], 2: []}
    for _ in range(args.repeats):
        for n in runs:
            runs[n].append(launch(n, args))
            r = runs[n][-1]
            print(f"{n} process(es) x {r['threads']} thread(s): {r['seconds']:.1f} s, {r['examples_per_s']:.2f} "
                  f"examples/s, all-reduce {1000 * r['allreduce_s_per_step']:.2f} ms/step "
                  f"(+ {1000 * r['wait_s_per_step']:.1f} ms waiting for the other process), "
                  f"final loss {r['final_loss']:.4f}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "examples_per_s", "allreduce_s_per_step", "wait_s_per_step")}
           for n, rs in runs.items()}
    step_2 = med[2]["seconds"] / runs[2][0]["steps"]
    report({"examples_per_s_1": med[1]["examples_per_s"], "examples_per_s_2": med[2]["examples_per_s"],
            "speedup_2_over_1": med[2]["examples_per_s"] / med[1]["examples_per_s"],
            "allreduce_ms_per_step_2": 1000 * med[2]["allreduce_s_per_step"],
            "allreduce_share_of_step_2": med[2]["allreduce_s_per_step"] / step_2,
            "wait_ms_per_step_2": 1000 * med[2]["wait_s_per_step"], "parameters": runs[1][0]["parameters"],
            "final_loss_1": runs[1][0]["final_loss"], "final_loss_2": runs[2][0]["final_loss"],
            "steps": runs[1][0]["steps"], "repeats": args.repeats})


if __name__ == "__main__":
    main()
