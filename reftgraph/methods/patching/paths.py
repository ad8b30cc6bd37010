"""Path patching (Wang et al. 2022, "Interpretability in the Wild"): the effect of sender
heads on receivers (the logits, or chosen heads' q/k/v inputs) through that path only.

The passes become streams of one graph, run in one forward:

- ``path`` (the base prompts): senders' ``head_out`` read from ``source``; every other
  head from the first sender's layer on is frozen to its ``base`` value (and the MLPs too
  with ``freeze="heads+mlp"``), so only paths through the senders change anything;
- ``base``: with receivers ``"logits"`` the metric reads ``path``'s logits; with receiver
  heads, ``base`` takes each receiver's q/k/v from ``path`` and everything else recomputes.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = path_graph(lm, senders=[(0, 1)], receivers=[rg.Site("q", 1, head=2)])
>>> sorted(g.streams), len(g.nodes)
(['base', 'path', 'source'], 2)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd

from ...core.graph import Graph
from ...core.ops import Patch
from ...engine import Job, as_model, compile_graph, executor, last_token, tokenize
from ...core.sites import Site
from ...errors import SiteError
from ..forwards import run_jobs
from ...training.counterfactual import Counterfactual
from .metrics import Reference, get_metric, restoration

FREEZE = ("heads", "heads+mlp")


def _heads(model, senders) -> dict:
    """``{layer: [heads]}`` from ``[(layer, head), ...]``, checked against the model."""
    arch, out = model.arch, {}
    for item in senders:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise SiteError(f"senders are (layer, head) pairs, got {item!r}")
        layer, head = arch.layer_index(item[0]), item[1]
        if layer is None or not 0 <= head < arch.n_heads:
            raise SiteError(f"sender {item}: valid layers 0..{arch.n_layers - 1}, heads 0..{arch.n_heads - 1}")
        out.setdefault(layer, []).append(head)
    if not out:
        raise SiteError("path patching needs at least one sender (layer, head)")
    return out


def path_graph(model, senders: Sequence[tuple], receivers: Union[str, Sequence[Site]] = "logits",
               positions="all", freeze: str = "heads", path: str = "path") -> Graph:
    """The graph of one path-patching experiment (see the module docstring).

    >>> import reftgraph as rg
    >>> print(path_graph(rg.models.tiny("llama"), senders=[(0, 2)]))      # head 2 of layer 0 -> the logits
    Graph(2 nodes, 0 trainable parameters)
      send0: Patch head_out[0].h2 pos=all @path
      freeze1: Patch head_out[1].h0+h1+h2+h3 pos=all @path

    ``senders``: ``(layer, head)`` pairs whose ``head_out`` (at ``positions``) comes from the
    source; ``receivers``: ``"logits"`` or q/k/v sites with heads, e.g.
    ``rg.Site("q", 9, head=6, positions="last")``; ``path``: the name of the path stream.
    """
    model = as_model(model, one_stack="rg.patching.path_graph")
    arch = model.arch
    if freeze not in FREEZE:
        raise SiteError(f"freeze must be one of {FREEZE}, got {freeze!r}")
    send = _heads(model, senders)
    if receivers == "logits":
        receivers, last = [], arch.n_layers - 1
    else:
        receivers = list(receivers)
        for site in receivers:
            if not isinstance(site, Site) or site.component not in ("q", "k", "v") or site.head is None:
                raise SiteError(f"receiver {site}: receivers are 'logits' or q/k/v sites with heads, "
                                "e.g. rg.Site('q', 9, head=6)")
            if arch.layer_index(site.layer) is None:
                raise SiteError(f"receiver {site}: layer out of range; valid layers 0..{arch.n_layers - 1}")
            if arch.layer_index(site.layer) <= min(send):
                raise SiteError(f"receiver {site} is not after every sender (first sender layer {min(send)}): "
                                "a sender can only reach receivers in later layers")
        last = max(arch.layer_index(s.layer) for s in receivers) - 1
    g = Graph()
    for layer in range(min(send), last + 1):
        if layer in send:
            g.add(Site("head_out", layer, positions=positions, head=tuple(send[layer])), Patch("source"),
                  name=f"send{layer}", stream=path)
        others = tuple(h for h in range(arch.n_heads) if h not in send.get(layer, ()))
        if others and layer > min(send):  # at the first sender's layer the others are unchanged
            g.add(Site("head_out", layer, head=others), Patch("base"), name=f"freeze{layer}", stream=path)
        if freeze == "heads+mlp":
            g.add(Site("mlp_out", layer), Patch("base"), name=f"freeze_mlp{layer}", stream=path)
    for i, site in enumerate(receivers):
        g.add(site, Patch(path), name=f"receive{i}")
    return g


def path_patch(model, data: Counterfactual, senders: Sequence[tuple], receivers="logits",
               positions="all", freeze: str = "heads", metric="logit_diff", remote=None) -> dict:
    """Run one path-patching experiment; returns the metric's mean for the base run, the
    source run, the path-patched run, and the normalised ``restoration``.

    >>> import reftgraph as rg
    >>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["x", "y"], wrong=["z", "w"])
    >>> out = path_patch(rg.models.tiny("llama"), data, senders=[(0, 1), (0, 3)])
    >>> sorted(out), out["senders"], out["metric"]
    (['head', 'layer', 'metric', 'restoration', 'senders', 'value'], [(0, 1), (0, 3)], 'logit_diff')

    The base prompts are those the path is patched into; the senders' values come from
    the source prompts. (Wang et al. patch corrupted values into clean runs: pass
    ``data.swap()`` to go that way with a dataset made for denoising.)
    """
    return path_sweep(model, data, [list(senders)], receivers, positions, freeze, metric,
                      remote=remote, progress=False).iloc[0].to_dict()


def path_sweep(model, data: Counterfactual, sender_sets: Optional[Sequence] = None, receivers="logits",
               positions="all", freeze: str = "heads", metric="logit_diff", per_forward: int = 8,
               remote=None, progress: bool = True) -> pd.DataFrame:
    """Path patching for each set of senders (default: every single head below the receivers),
    ``per_forward`` sets batched as streams of one forward.

    >>> import reftgraph as rg
    >>> data = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["x", "y"], wrong=["z", "w"])
    >>> table = path_sweep(rg.models.tiny("llama"), data)      # 2 layers x 4 heads
    >>> len(table), table.columns.tolist()
    (8, ['layer', 'head', 'senders', 'metric', 'value', 'restoration'])

    One row per set: ``layer`` and ``head`` (for single senders), ``senders``, ``value``
    and ``restoration``. ``remote`` as in :func:`reftgraph.patching.sweep`: every forward in
    one nnsight session, the metric's means computed on the server. A progress bar counts
    the forwards; ``progress=False`` hides it.
    """
    model = as_model(model, one_stack="rg.patching.path_sweep")
    arch = model.arch
    metric_name, metric_fn = get_metric(metric)
    if sender_sets is None:
        top = arch.n_layers if receivers == "logits" else min(arch.layer_index(s.layer) for s in receivers)
        sender_sets = [[(layer, h)] for layer in range(top) for h in range(arch.n_heads)]
    graphs = [path_graph(model, s, receivers, positions, freeze, path=f"path{i}") for i, s in enumerate(sender_sets)]
    ex = executor(model, remote, graphs[0] if graphs else None)
    correct, wrong = data.answer_ids(model, required=False)
    jobs = [_paths_job(model, data, Graph(), [], receivers, metric_fn, correct, wrong)]
    for lo in range(0, len(graphs), per_forward):
        jobs.append(_paths_job(model, data, graphs[lo:lo + per_forward], range(lo, lo + per_forward), receivers,
                               metric_fn, correct, wrong))
    jobs = [Job(compile_graph(g, model.arch).bind(batch), inputs, reduce) for g, inputs, batch, reduce in jobs]
    results = run_jobs(ex, jobs, progress=progress, desc="path sweep")
    base, source = results[0]
    values = [v for chunk in results[1:] for v in chunk]
    df = pd.DataFrame({
        "layer": [s[0][0] if len(s) == 1 else None for s in sender_sets],
        "head": [s[0][1] if len(s) == 1 else None for s in sender_sets],
        "senders": [list(s) for s in sender_sets],
        "metric": metric_name, "value": values})
    df["restoration"] = restoration(df["value"], base, source)
    df.attrs.update(metric=metric_name, base=base, source=source)
    return df


def _paths_job(model, data, graphs, numbers, receivers, metric_fn, correct, wrong) -> tuple:
    """Several path graphs as one forward, each with its own path (and base) stream:
    ``(graph, inputs, batch, reduce)``, ``reduce`` giving each graph's metric mean. Without
    graphs: the clean run, ``reduce`` giving the base and source means."""
    combined, streams = Graph(), {"base": data.base, "source": data.source}
    for i, g in zip(numbers, graphs):
        streams[f"path{i}"] = data.base
        for node in g.nodes:  # receivers write into a base stream of their own
            stream = f"base{i}" if node.stream == "base" else node.stream
            streams.setdefault(stream, data.base)
            combined.add(node.site, node.op, name=f"{node.name}_{i}", stream=stream)
    inputs, batch = tokenize(model, streams)
    read = [f"path{i}" if receivers == "logits" else f"base{i}" for i, _ in zip(numbers, graphs)]

    def reduce(logits, collected):   # (on the server, for a remote call) next-token logits -> metric means
        ref = Reference(correct, wrong, last_token(logits, batch, "source"))
        if not read:
            return (float(metric_fn(last_token(logits, batch), ref).mean()),
                    float(metric_fn(ref.source_logits, ref).mean()))
        return [float(metric_fn(last_token(logits, batch, stream), ref).mean()) for stream in read]

    return combined, inputs, batch, reduce
