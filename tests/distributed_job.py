"""Training jobs for tests/test_distributed.py: run under ``torchrun`` (or ``accelerate launch``)
with 2 processes, or imported and run in one process for the reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_job.py OUT JOB

JOB: ``train`` (rg.train, 7 rows, batch 3: batches of 3, 3 and 1 rows), ``das`` (DAS on a
tiny model) or ``kill`` (``train`` that kills process 0 while it writes the epoch-2
checkpoint): each process writes ``OUT/rank-R.safetensors`` (the graph's weights) and
``OUT/history-R.json``. ``memorise``: a memorisation run whose time budget has passed on
process 0 only; each process writes ``OUT/steps-R.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import reftgraph as rg
from reftgraph.training import checkpoints, distributed

ROWS = [("ab", "cd"), ("abc", "dd"), ("b", "ccd"), ("ca", "a"), ("bb", "cab"), ("a", "bd"), ("cc", "d")]


def reft_init():
    """The graph's weights before training."""
    return rg.reft_graph(rg.models.tiny("llama"), layers=[0, 1], positions="f1+l1", rank=2).ops.state_dict()


def reft(out: Path, epochs: int = 3, resume=False, kill_at: int = -1):
    lm = rg.models.tiny("llama")
    g = rg.reft_graph(lm, layers=[0, 1], positions="f1+l1", rank=2)
    if kill_at >= 0:
        write = checkpoints.save_file

        def dying(tensors, path):   # process 0 dies after a first file of epoch `kill_at` hits the disk
            write(tensors, path)
            if f"epoch-{kill_at}" in str(path) and distributed.is_main():
                os._exit(9)
        checkpoints.save_file = dying

    def eval_fn(graph, model, epoch):
        return {"eval_loss": rg.training.evaluate(graph, model, rg.data.PromptResponse(ROWS[:2]))}

    history = rg.train(g, lm, rg.data.PromptResponse(ROWS), epochs=epochs, batch_size=3, lr=0.05, warmup=0.0,
                       checkpoint_dir=out / "ckpt", resume=resume, eval_fn=eval_fn, progress=False)
    return g, history


def das(out: Path):
    lm = rg.models.tiny("llama")
    data = rg.patching.Counterfactual(["ab", "ba", "abc", "cab", "bca"], ["ba", "ab", "cab", "abc", "bac"],
                                      correct=["a", "b", "c", "a", "b"])
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Rotate(width=32, k=2, boundless=True, seed=0),
          name="r")
    history = rg.das.train_das(g, lm, data, epochs=3, batch_size=3, lr=0.05, boundary_penalty=0.1, progress=False)
    return g, history


def memorise(out: Path, rank: int):
    from reftgraph.memorisation import memorise
    result = memorise(rg.models.tiny("llama"), [5, 6, 7, 8], layer=1, lr=1e-6, max_steps=50,
                      max_seconds=0 if rank == 0 else 3600, greedy=False)
    (out / f"steps-{rank}.json").write_text(json.dumps(result.steps))


def main(out: Path, job: str):
    distributed.init()
    rank, size = distributed.world()
    if job == "memorise":
        return memorise(out, rank)
    g, history = das(out) if job == "das" else reft(out, kill_at=2 if job == "kill" else -1)
    save_file({k: v.detach().contiguous() for k, v in g.ops.state_dict().items()}, str(out / f"rank-{rank}.safetensors"))
    (out / f"history-{rank}.json").write_text(history.to_json(orient="records"))
    (out / f"world-{rank}.json").write_text(json.dumps([rank, size]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    if torch.distributed.is_initialized():
        # every process done with its collectives before any tears the group down: a process
        # that destroys it (and exits) while its peer's gloo threads still talk to it makes
        # the peer abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
