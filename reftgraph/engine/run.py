"""Run a graph: tokenize every stream into one batch, bind the plan to it, and trace once.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Patch(source="source"))
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="f1+l1"), rg.Collect(), name="m")
>>> out = g.run(lm, ["a cat", "the dog"], sources={"source": ["one", "two"]})
>>> out["m"].shape, out.next_token_logits.shape
(torch.Size([2, 2, 32]), torch.Size([2, 259]))

``forward`` and ``forwards`` are the engine's older calls, kept for code written against
them (they warn once): :func:`~reftgraph.engine.traces.trace` and the executors of
:mod:`reftgraph.engine.executors` replace them.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from ..arch.models import Model
from ..core.graph import Graph
from ..errors import DataError, RemoteError, SiteError
from .bind import Batch
from .context import (as_model, attention_for, inference_mode, input_device, layer_device, place, runnable,  # noqa: F401
                      serial)
from .executors import Job, executor
from .plan import Plan, compile_graph
from .remote import is_remote
from .tokens import Prompts, from_inputs, last_token, prompt_list, tokenize  # noqa: F401
from .traces import Skip, touches_logits


@dataclass
class RunResult:
    """What a run returns: the base stream's logits and the collected activations.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0, positions="prompt"), rg.Collect(), name="r")
    >>> out = g.run(rg.models.tiny("llama"), ["abcd", "ab"])
    >>> out.logits.shape, out["r"].shape, out.valid["r"].tolist()   # row 1 has 2 tokens
    (torch.Size([2, 4, 259]), torch.Size([2, 4, 32]), [[True, True, True, True], [True, True, False, False]])

    ``result[name]`` is node ``name``'s collected slice ``[B, k, ...]``;
    ``result.valid[name]`` marks the real positions of rows with fewer than ``k``.
    """

    logits: torch.Tensor
    collected: dict
    valid: dict
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: dict
    last_index: torch.Tensor
    stream_logits: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.collected:
            raise KeyError(f"no collected node {name!r}; collected: {sorted(self.collected)}")
        return self.collected[name]

    @property
    def next_token_logits(self) -> torch.Tensor:
        """``[B, vocab]``: the base stream's logits at each row's last prompt token.

        >>> import reftgraph as rg
        >>> out = rg.Graph().run(rg.models.tiny("llama"), ["abcd", "ab"])
        >>> torch.equal(out.next_token_logits[1], out.logits[1, 1])   # "ab": 2 tokens, right-padded
        True
        """
        rows = self.rows["base"]
        return self.logits[torch.arange(self.logits.shape[0]), self.last_index[rows]]

    def __repr__(self) -> str:
        shape = (lambda t: "[" + ", ".join(map(str, t.shape)) + "]")
        collected = ", ".join(f"{name} {shape(value)}" for name, value in self.collected.items()) or "nothing"
        streams = ", ".join(f"{name} {len(range(*rows.indices(len(self.input_ids))))}"
                            for name, rows in self.rows.items())
        return f"RunResult(logits {shape(self.logits)}; collected: {collected}; rows per stream: {streams})"

    def _repr_html_(self) -> str:
        import html

        shape = (lambda t: " x ".join(map(str, t.shape)))
        cells = [("logits (base stream)", shape(self.logits), "[rows, positions, vocab]")]
        for name, value in self.collected.items():
            short = int((~self.valid[name]).any(-1).sum()) if name in self.valid else 0
            cells.append((f"[{name!r}]", shape(value), f"{short} rows with fewer positions (see .valid)" if short
                          else "[rows, positions, ...]"))
        top = self.next_token_logits.argmax(-1)[:8].tolist()
        streams = ", ".join(f"{name}: {len(range(*rows.indices(len(self.input_ids))))} rows"
                            for name, rows in self.rows.items())
        body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{html.escape(c)}</td></tr>" for a, b, c in cells)
        return (f"<p><b>RunResult</b> ({html.escape(streams)}); next token ids (argmax) of the base rows: "
                f"{top}{' ...' if len(self.next_token_logits) > 8 else ''}</p>"
                f"<table><tr><th>value</th><th>shape</th><th></th></tr>{body}</table>")


def run(graph: Graph, model: Model, prompts: Prompts, sources: Optional[dict] = None,
        padding_side: Optional[str] = None, grad: Optional[bool] = None, remote=None,
        subspaces=None, logits: str = "all") -> RunResult:
    """Run ``graph`` on ``prompts`` with named ``sources`` (stream -> prompts) in one forward.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Patch("source"))
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect(), name="x")
    >>> out = run(g, rg.models.tiny("llama"), ["ab", "cd"], sources={"source": ["b"]})
    >>> torch.equal(out["x"][0], out["x"][1])   # one source prompt, used for both rows
    True

    Everything is checked before the forward pass: the graph against the model, the
    streams the graph reads against ``sources``, and every position against every row.
    A source with one prompt is used for every base row. Gradients flow to the graph's
    parameters when any requires grad (``grad=`` forces it on or off).

    ``remote=True`` runs the trace on NDIF (the model loaded by its Hugging Face id, e.g.
    ``rg.load(id, dispatch=False)``), ``remote="local"`` in nnsight's local simulation of
    it (see :mod:`reftgraph.engine.remote`); the logits and the collected values come back.

    ``subspaces`` chooses, per call or per row, the dims of each learned basis (ReFT ops,
    ``Rotate``) the edit uses: ``[0, 1, 2, 3]`` for every row, ``[[0, 1], [2, 3]]`` one per
    row, ``{"node": ...}`` per node (see :func:`reftgraph.engine.bind.with_subspaces`).

    ``prompts`` may instead be model inputs made elsewhere: a dict (a processor's output) of
    ``input_ids``, ``attention_mask`` and anything else the model takes (``pixel_values``),
    passed through; on a vision-language model ``positions="image"`` then selects each row's
    image tokens (:func:`reftgraph.engine.tokens.from_inputs`).

    ``logits="last"`` computes the logits at each row's last prompt token alone (the model's
    ``logits_to_keep``: its head runs on those positions only, forward and backward): the
    result's ``logits`` are then ``[B, 1, vocab]``, its ``next_token_logits`` as before. What
    a metric of the next token needs, for a fraction of the head's cost.
    """
    model = as_model(model)
    if logits not in ("all", "last"):
        raise DataError(f"logits must be 'all' or 'last', got {logits!r}")
    plan = compile_graph(graph, model.arch)
    ex = executor(model, remote, graph)
    if isinstance(prompts, Mapping):      # model inputs made elsewhere (a processor's, with images)
        if sources:
            raise DataError("sources need prompts as text; model inputs (a dict) are one stream, the base")
        return _forward(graph, plan, ex, *from_inputs(model, prompts), grad, subspaces, logits)
    base = prompt_list(prompts, "prompts")
    streams = {"base": base}
    if sources is not None and not isinstance(sources, dict):
        raise DataError(f"sources must be a dict {{stream name: prompts}}, e.g. sources={{'source': [...]}}; "
                        f"got {type(sources).__name__}")
    for name, src in (sources or {}).items():
        src = prompt_list(src, f"sources[{name!r}]")
        if len(src) == 1 and len(base) > 1:
            src = src * len(base)
        streams[name] = src
    unused = set(streams) - graph.streams - {"base"}
    if unused:
        raise SiteError(f"sources {sorted(unused)} are not read by any node of the graph "
                        f"(streams it uses: {sorted(graph.streams)})")
    inputs, batch = tokenize(model, streams, padding_side)
    return _forward(graph, plan, ex, inputs, batch, grad, subspaces, logits)


@functools.lru_cache(maxsize=None)
def _keeps_logits(model_class) -> bool:
    """Whether the model class's forward takes ``logits_to_keep`` as positions (asked once per class)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _forward(graph, plan, ex, inputs, batch, grad, subspaces, which="all") -> RunResult:
    """One traced forward of ``plan`` on a tokenized batch: the run's result."""
    if grad and ex.remote is not None:
        raise RemoteError("gradients do not come back from a remote run; train locally (or pass grad=False)")
    if grad is None:
        grad = ex.remote is None and any(p.requires_grad for p in graph.parameters())
    bound = plan.bind(batch, subspaces)
    last = batch.start + batch.length - 1
    keep = None
    if which == "last" and _keeps_logits(type(ex.model.hf)) and not touches_logits(plan):
        keep = torch.unique(last)            # (sorted) the positions whose logits are computed
        inputs = {**inputs, "logits_to_keep": keep.to(inputs["input_ids"].device)}
    with torch.set_grad_enabled(grad), inference_mode(graph):
        logits, collected = ex.forward(bound, inputs)
    if keep is not None:     # each row's own last position, then [N, 1, vocab]
        at = torch.searchsorted(keep, last).to(logits.device)
        logits, last = logits[torch.arange(logits.shape[0], device=logits.device), at][:, None], torch.zeros_like(last)
    return RunResult(
        logits=logits[batch.rows["base"]],
        collected={k: v[0] for k, v in collected.items()},
        valid={k: v[1] for k, v in collected.items()},
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        rows=batch.rows,
        last_index=last.to(logits.device),
        stream_logits={name: logits[rows] for name, rows in batch.rows.items()},
    )


_WARNED: set = set()


def _old_call(name: str, instead: str) -> None:
    """Warn once per process that ``name`` is the engine's older call."""
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"reftgraph.engine.{name} is the engine's older call; use {instead}", DeprecationWarning,
                      stacklevel=3)


def forward(plan: Plan, model: Model, inputs: dict, batch: Batch, hidden: bool = False, prefix=None, cache=None,
            stop: bool = False, remote=None, subspaces=None):
    """The older one-forward call: ``(value, {name: (value, valid)})`` (warns once).

    >>> import warnings, reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     hidden, collected = forward(compile_graph(g, lm.arch), lm, inputs, batch, hidden=True)
    >>> hidden.shape
    torch.Size([2, 3, 32])

    Today: ``executor(model, remote).forward(plan.bind(batch, subspaces), inputs, output=...,
    skip=...)`` (:mod:`reftgraph.engine.executors`), with ``output="hidden"`` for ``hidden=True``,
    ``output=None`` for ``stop=True``, ``skip=Skip(*prefix)`` or ``skip=cache.skip(plan, inputs)``.
    """
    _old_call("forward", "executor(model).forward(plan.bind(batch), inputs, output=..., skip=...)")
    output = None if stop else "hidden" if hidden else "logits"
    if cache is not None:
        skip = cache.skip(plan, inputs)
    else:
        skip = Skip(*prefix) if prefix is not None else None
    bound = plan.bind(batch, subspaces)
    return executor(model, remote if is_remote(remote) else None).forward(bound, inputs, output=output, skip=skip)


def forwards(model: Model, jobs: Sequence[tuple], remote=None) -> list:
    """The older several-forwards call, ``jobs`` of ``(plan, inputs, batch, reduce)`` (warns once).

    >>> import warnings, reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> job = (compile_graph(g, lm.arch), inputs, batch, lambda logits, collected: logits.shape[0])
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     forwards(lm, [job, job], remote="local")
    [2, 2]

    Today: ``executor(model, remote).map([Job(plan.bind(batch), inputs, reduce), ...])``.
    """
    _old_call("forwards", "executor(model, remote).map([Job(plan.bind(batch), inputs, reduce), ...])")
    ex = executor(model, remote if is_remote(remote) else None)
    return ex.map([Job(plan.bind(batch), inputs, reduce) for plan, inputs, batch, reduce in jobs])
