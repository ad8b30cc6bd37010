"""Training on several processes (``torchrun``, ``accelerate launch``): data parallel over the
graph's parameters only, with ``torch.distributed``.

>>> rank, size = world()
>>> (rank, size), share([4, 7, 9])      # one process: every row is its own
((0, 1), [4, 7, 9])

Under a launcher (``WORLD_SIZE`` > 1 in the environment) :func:`reftgraph.training.loop.fit`
joins the process group itself (gloo on CPU, NCCL on GPUs). Every process holds the whole
frozen model and computes the loss of its rows of each global batch (:func:`share`) as its
part of the batch's loss, so that the parts add up to the loss one process would compute on
the whole batch; the gradients of the graph's parameters are summed over processes in one
all-reduce (the language model is never wrapped: it has no gradients to sync). Every
process then takes the same optimizer step: the weights, the history and the random state
stay identical, and process 0 alone writes checkpoints and files.
"""

from __future__ import annotations

import atexit
import json
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["all_sum", "barrier", "broadcast", "broadcast_json", "close", "init", "is_main", "share", "sum_gradients",
           "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group.

    >>> world()
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or no process group).

    >>> is_main()
    True
    """
    return world()[0] == 0


def init(backend: Optional[str] = None) -> tuple[int, int]:
    """Join the process group a launcher set up (``WORLD_SIZE`` > 1), once; returns :func:`world`.

    >>> init()          # not under a launcher: nothing to join
    (0, 1)

    The backend is ``backend``, else ``$REFTGRAPH_BACKEND``, else NCCL when CUDA is there
    (each process on ``cuda:$LOCAL_RANK``) and gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or os.environ.get("REFTGRAPH_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(close)
    return world()


def close() -> None:
    """Leave the process group :func:`init` joined; it also runs at exit, while the interpreter
    is still whole.

    >>> close()         # no process group: nothing to leave

    Without it, gloo's worker threads can outlive the interpreter's teardown and abort the
    process at exit ("terminate called without an active exception"), after a run that
    succeeded: a launcher then reports the whole job failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(rows: Sequence) -> list:
    """This process's rows of a global batch: every ``world size``-th row from its rank.

    >>> share(range(5))
    [0, 1, 2, 3, 4]
    """
    rank, size = world()
    return list(rows)[rank::size]


def all_sum(value: float) -> float:
    """``value`` summed over processes (itself with one process).

    >>> all_sum(2.5)
    2.5
    """
    if world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t)


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over processes in one all-reduce (a missing one counts as zero).

    >>> p = torch.ones(2, requires_grad=True); p.grad = torch.ones(2)
    >>> sum_gradients([p]); p.grad.tolist()
    [1.0, 1.0]
    """
    if world()[1] == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(_device())
                      for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device)
        offset += n


def broadcast(params: Sequence[torch.Tensor]) -> None:
    """Give every process process 0's values of ``params`` (in place).

    >>> p = torch.zeros(2); broadcast([p]); p.tolist()
    [0.0, 0.0]
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            t = p.detach().to(_device())
            dist.broadcast(t, 0)
            p.copy_(t)


def broadcast_json(value):
    """Process 0's ``value`` (anything JSON can write) on every process; sent as JSON, never pickled.

    >>> broadcast_json({"caps": 0.5})
    {'caps': 0.5}
    """
    if world()[1] == 1:
        return value
    data = json.dumps(value, default=float).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=_device())
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=_device())
    if is_main():
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def barrier() -> None:
    """Wait for every process (nothing with one process).

    >>> barrier()
    """
    if world()[1] > 1:
        dist.barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
