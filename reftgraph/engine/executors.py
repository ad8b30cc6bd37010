"""Where forwards run, chosen once per call: here (:class:`Local`) or on a remote server
(:class:`Remote`: NDIF, or nnsight's simulation of it). A method builds its forwards as
:class:`Job` values and hands them to its executor, so it has one algorithm for both.

>>> import reftgraph as rg
>>> from reftgraph.engine import compile_graph, tokenize
>>> lm = rg.models.tiny("llama")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(batch), inputs, lambda logits, collected: logits[:, -1].argmax(-1))
>>> here, there = executor(lm).map([job, job]), executor(lm, remote="local").map([job, job])
>>> all(torch.equal(a, b) for a, b in zip(here, there))
True
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import nnsight
import torch  # noqa: F401  (the doctests use it)

from ..arch.models import Model
from ..errors import RemoteError
from .bind import BoundPlan
from .context import as_model, serial
from .remote import INSIDE, check, shipped
from .traces import Outputs, Skip, trace

__all__ = ["Job", "Local", "Remote", "executor"]


class Job(NamedTuple):
    """One forward an executor runs: ``reduce(value, collected)`` of the :class:`Outputs`
    of ``bound`` on ``inputs`` is what comes back (remotely it runs on the server, so reduce
    to what the caller needs: a metric's value, the last position).

    >>> import reftgraph as rg
    >>> from reftgraph.engine import Batch, compile_graph
    >>> lm = rg.models.tiny("llama")
    >>> ids = lm.arch.inputs(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
    >>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(Batch.full(1, 2)), ids, lambda v, c: v.shape, output="hidden")
    >>> executor(lm).map([job])
    [torch.Size([1, 2, 32])]
    """

    bound: BoundPlan
    inputs: dict
    reduce: Callable
    output: Optional[str] = "logits"


class Local:
    """Forwards on this machine, one at a time.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph, tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, batch = tokenize(lm, {"base": ["ab"]})
    >>> ex = executor(lm)
    >>> ex.remote, ex.forward(compile_graph(rg.Graph(), lm.arch).bind(batch), inputs).value.shape
    (None, torch.Size([1, 2, 259]))
    """

    remote = None

    def __init__(self, model: Model):
        self.model = model

    def forward(self, bound: BoundPlan, inputs: dict, *, output: Optional[str] = "logits",
                skip: Optional[Skip] = None) -> Outputs:
        """One forward (:func:`~reftgraph.engine.traces.trace`); for a remote executor, one
        request whose value and collected nodes come back.

        >>> import reftgraph as rg
        >>> from reftgraph.engine import compile_graph, tokenize
        >>> lm = rg.models.tiny("llama")
        >>> inputs, batch = tokenize(lm, {"base": ["ab", "c"]})
        >>> bound = compile_graph(rg.Graph(), lm.arch).bind(batch)
        >>> there, here = (executor(lm, remote).forward(bound, inputs).value for remote in ("local", None))
        >>> torch.equal(there, here), here.shape
        (True, torch.Size([2, 2, 259]))
        """
        if skip is not None and self.remote is not None:
            raise RemoteError("a remote forward cannot skip blocks with values computed here; run it without skip")
        return trace(self.model, bound, inputs, output=output, skip=skip, remote=self.remote)

    def map(self, jobs: Sequence[Job], done: Optional[Callable[[int], None]] = None) -> list:
        """Each job's reduced outputs, in order; ``done(n)`` after each ``n`` finished jobs
        (a progress bar's ``update``).

        >>> import reftgraph as rg
        >>> from reftgraph.engine import Batch, compile_graph
        >>> lm = rg.models.tiny("llama")
        >>> ids = lm.arch.inputs(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
        >>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(Batch.full(1, 2)), ids, lambda v, c: v.shape[-1])
        >>> executor(lm).map([job, job])
        [259, 259]
        """
        results = []
        for job in jobs:
            results.append(job.reduce(*self.forward(job.bound, job.inputs, output=job.output)))
            if done is not None:
                done(1)
        return results


class Remote(Local):
    """Forwards on a remote server (``remote=True``: NDIF; ``"local"``: nnsight's simulation;
    or a host URL): :meth:`~Local.forward` sends one request, :meth:`map` one session of all
    the jobs, whose reduce functions run on the server.

    >>> import reftgraph as rg
    >>> ex = executor(rg.models.tiny("llama"), remote="local")
    >>> type(ex).__name__, ex.remote
    ('Remote', 'local')
    """

    def __init__(self, model: Model, remote):
        super().__init__(model)
        self.remote = remote

    def map(self, jobs: Sequence[Job], done: Optional[Callable[[int], None]] = None) -> list:
        """Every job in one nnsight session (one request); ``done(len(jobs))`` when the results are back.

        >>> import reftgraph as rg
        >>> from reftgraph.engine import Batch, compile_graph
        >>> lm = rg.models.tiny("llama")
        >>> ids = lm.arch.inputs(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
        >>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(Batch.full(1, 2)), ids, lambda v, c: v.shape[-1])
        >>> executor(lm, "local").map([job] * 3)
        [259, 259, 259]
        """
        light = shipped(self.model)
        with serial(self.model), self.model.nn.session(remote=self.remote):
            results = _reduced(light, list(jobs))
            nnsight.save(results)
        if done is not None:
            done(len(jobs))
        return results


def _reduced(model: Model, jobs: list) -> list:
    """The forwards of a remote session (run by the server)."""
    return [job.reduce(*trace(model, job.bound, job.inputs, output=job.output, remote=INSIDE)) for job in jobs]


def executor(model, remote=None, graph=None) -> Local:
    """The executor of a call: :class:`Remote` when ``remote`` asks for it (checked here,
    before anything is sent, with ``graph``'s ops: :func:`reftgraph.engine.remote.check`),
    else :class:`Local`.

    >>> import reftgraph as rg
    >>> type(executor(rg.models.tiny("llama"))).__name__
    'Local'
    """
    model = as_model(model)
    return Remote(model, remote) if check(remote, model, graph) else Local(model)
