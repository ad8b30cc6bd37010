"""Train Rotate (DAS) graphs on counterfactual data with the language model frozen, and
measure interchange-intervention accuracy (IIA) per counterfactual type.

>>> import reftgraph as rg
>>> from reftgraph.core.ops import Rotate
>>> from reftgraph.methods.das import iia, train_das
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), Rotate(width=32, k=4, seed=0), name="das")
>>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["x", "y"], meta=[{"type": "t"}] * 2)
>>> history = train_das(g, lm, data, epochs=1, batch_size=2, progress=False)
>>> list(history.columns), list(iia(g, lm, data).columns)
(['epoch', 'step', 'loss', 'lr', 'temperature'], ['type', 'n', 'iia'])

``data`` is a :class:`reftgraph.patching.Counterfactual` (e.g. from
:meth:`reftgraph.causal.CausalModel.dataset`): ``correct`` holds the token the model
should predict after the interchange (one token per row); ``meta[i]["type"]`` names the
row's counterfactual type.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from ..core.graph import Graph
from ..core.ops.rotate import Rotate
from ..engine import Job, as_model, compile_graph, executor, inference_mode, last_token, tokenize
from ..training import final_hidden
from ..training.distributed import share, world
from ..training.loop import Callback, fit, positive_ints
from .forwards import run_jobs


def boundless_ops(graph) -> list:
    """The boundless :class:`Rotate` ops of a graph (or of an iterable of modules).

    >>> ops = [Rotate(width=8, k=2), Rotate(width=8, k=2, boundless=True)]
    >>> [op.boundless for op in boundless_ops(ops)]
    [True]
    """
    modules = graph.ops.modules() if isinstance(graph, Graph) else graph
    return [m for m in modules if isinstance(m, Rotate) and m.boundless]


def temperature_at(step: int, total: int, schedule: tuple) -> float:
    """Geometric annealing from ``schedule[0]`` (step 0) to ``schedule[1]`` (the last step).

    >>> [round(temperature_at(s, 3, (50.0, 0.5)), 2) for s in range(3)]
    [50.0, 5.0, 0.5]
    """
    t0, t1 = schedule
    frac = step / max(1, total - 1)
    return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))


def types(data) -> list:
    """Each row's counterfactual type (``meta[i]["type"]``; ``"all"`` without one).

    >>> import reftgraph as rg
    >>> types(rg.patching.Counterfactual(["a", "b"], ["c", "d"], meta=[{"type": "x"}, {}]))
    ['x', 'all']
    """
    meta = data.meta or [{}] * len(data)
    return [m.get("type", "all") if isinstance(m, dict) else str(m) for m in meta]


def _tokenized(graph, model, data, rows) -> tuple:
    """``(inputs, batch)`` of data rows ``rows``: the base prompts and the sources the graph reads."""
    streams = {"base": [data.base[i] for i in rows]}
    streams.update({k: [v[i] for i in rows] for k, v in data.sources.items() if k in graph.streams})
    return tokenize(model, streams)


def _logits(plan, graph, model, data, rows) -> torch.Tensor:
    """Next-token logits ``[B, vocab]`` after each base prompt; the language-model head runs
    on those positions only (as in :func:`reftgraph.train`)."""
    inputs, batch = _tokenized(graph, model, data, rows)
    hidden, _ = final_hidden(plan, model, inputs, batch)
    return model.hf.get_output_embeddings()(last_token(hidden, batch))


def train_das(graph: Graph, model, data, *, epochs: int = 3, batch_size: int = 16, lr: float = 1e-3,
              temperature: tuple = (50.0, 0.1), boundary_penalty: float = 0.0, seed: int = 0,
              progress: bool = True, eval_fn: Optional[Callable] = None) -> pd.DataFrame:
    """Fit the graph's parameters so the next token after each base prompt, with the
    interchange applied, is ``data.correct`` (cross-entropy; Adam; the model frozen).

    >>> import reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0, positions="last"), Rotate(width=32, k=2, boundless=True))
    >>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["x", "y"])
    >>> history = train_das(g, lm, data, epochs=3, batch_size=2, temperature=(10.0, 0.1), progress=False)
    >>> history["temperature"].round(3).tolist()     # annealed geometrically, one step per epoch here
    [10.0, 1.0, 0.1]

    Boundless :class:`Rotate` ops get their temperature annealed from ``temperature[0]``
    to ``temperature[1]``; ``boundary_penalty`` adds that weight times the mean boundary
    (the soft subspace size), pushing towards small subspaces. Returns the history (one
    row per step), with ``eval_fn(graph, model, epoch) -> dict`` metrics after each epoch.
    A progress bar counts the steps (``progress=False`` hides it).
    """
    model = as_model(model, one_stack="rg.das.train_das")
    target, _ = data.answer_ids(model)
    plan = compile_graph(graph, model.arch)
    boundless = boundless_ops(graph)
    n = len(data)
    positive_ints(epochs=epochs, batch_size=batch_size)
    total = math.ceil(n / batch_size) * epochs
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> list:
        order = torch.randperm(n, generator=gen).tolist()
        return [order[b:b + batch_size] for b in range(0, n, batch_size)]

    def loss(rows: list) -> torch.Tensor:   # this process's part (all of it on one process)
        mine = share(rows)
        value = torch.zeros(())
        if mine:
            logits = _logits(plan, graph, model, data, mine)
            value = torch.nn.functional.cross_entropy(logits.float(), target[mine].to(logits.device))
            value = value * (len(mine) / len(rows))
        if boundary_penalty and boundless:
            penalty = boundary_penalty * torch.stack([op.boundary for op in boundless]).mean()
            value = value + penalty / world()[1]
        return value

    anneal = Anneal(boundless, total, temperature)
    return fit(graph, model, batches, loss, epochs=epochs, lr=lr, callbacks=[anneal], eval_fn=eval_fn,
               total_steps=total, progress=progress, desc="das")


class Anneal(Callback):
    """The training callback that sets each boundless Rotate's temperature before a step.

    >>> from reftgraph.core.ops import Rotate
    >>> op = Rotate(width=8, k=2, boundless=True)
    >>> cb = Anneal([op], total=3, schedule=(10.0, 0.1))
    >>> from reftgraph.training import State
    >>> cb.on_batch(State(None, None, None), [0]); round(float(op.temperature), 3)
    10.0

    The history gets a ``temperature`` column (NaN when there is no boundless op)."""

    def __init__(self, ops: list, total: int, schedule: tuple):
        self.ops, self.total, self.schedule = ops, total, schedule
        self.value = float("nan")

    def on_batch(self, state, batch) -> None:
        if self.ops:
            self.value = temperature_at(state.step, self.total, self.schedule)
            for op in self.ops:
                op.temperature.fill_(self.value)

    def on_step(self, state, row: dict) -> None:
        row["temperature"] = self.value


def predict(graph: Graph, model, data, batch_size: int = 32, remote=None, progress: bool = True) -> torch.Tensor:
    """The argmax next token after each base prompt, with the graph's interchanges ``[N]``.

    >>> import reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=-1, positions="last"), rg.Patch("source"))
    >>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"])
    >>> torch.equal(predict(g, lm, data), rg.Graph().run(lm, data.source).next_token_logits.argmax(-1))
    True

    ``remote`` as in :func:`reftgraph.run`: every batch is a trace of one nnsight session
    and only the predicted ids come back. A progress bar counts the batches
    (``progress=False`` hides it).
    """
    model = as_model(model, one_stack="rg.das.predict")
    plan = compile_graph(graph, model.arch)
    ex = executor(model, remote, graph)
    jobs = []
    for start in range(0, len(data), batch_size):
        inputs, batch = _tokenized(graph, model, data, range(start, min(start + batch_size, len(data))))
        jobs.append(Job(plan.bind(batch), inputs, lambda logits, _, batch=batch: last_token(logits, batch).argmax(-1)))
    with torch.no_grad(), inference_mode(graph):
        return torch.cat([p.cpu() for p in run_jobs(ex, jobs, progress=progress, desc="predict")])


def iia_table(hits: Sequence, row_types: Sequence) -> pd.DataFrame:
    """Accuracy per type, then an ``all`` row: columns ``type, n, iia``.

    >>> iia_table([1, 0, 1, 1], ["wx", "wx", "yz", "yz"]).values.tolist()
    [['wx', 2, 0.5], ['yz', 2, 1.0], ['all', 4, 0.75]]
    """
    frame = pd.DataFrame({"type": list(row_types), "hit": [float(h) for h in hits]})
    table = frame.groupby("type", sort=True)["hit"].agg(["size", "mean"]).reset_index()
    table.columns = ["type", "n", "iia"]
    if len(table) > 1 or table["type"].iloc[0] != "all":
        table.loc[len(table)] = ["all", len(frame), frame["hit"].mean()]
    return table


def iia(graph: Graph, model, data, batch_size: int = 32, remote=None, progress: bool = True) -> pd.DataFrame:
    """Interchange-intervention accuracy: the share of rows whose predicted next token is
    ``data.correct``, per counterfactual type and overall.

    >>> import reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=-1, positions="last"), rg.Patch("source"))
    >>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["a", "b"],
    ...                                   meta=[{"type": "x"}, {"type": "y"}])
    >>> iia(g, lm, data).values.tolist()     # an untrained random model gets none right
    [['x', 1, 0.0], ['y', 1, 0.0], ['all', 2, 0.0]]

    ``remote`` and ``progress`` as in :func:`predict`.
    """
    target, _ = data.answer_ids(as_model(model))
    hits = predict(graph, model, data, batch_size, remote=remote, progress=progress) == target
    return iia_table(hits.tolist(), types(data))
