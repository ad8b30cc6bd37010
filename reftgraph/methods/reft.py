"""Build the ReFT paper's graphs in one call.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[0, 1], positions="f3+l3", rank=4)
>>> [str(n.site) for n in g.nodes]
['resid_post[0] pos=f3+l0', 'resid_post[0] pos=f0+l3', 'resid_post[1] pos=f3+l0', 'resid_post[1] pos=f0+l3']
>>> g.num_parameters() == 4 * (2 * 4 * 32 + 4)
True
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from ..core.graph import Graph
from ..core.ops.reft import ACTIVATIONS, REFT_OPS
from ..core.settings import Settings, number, one_of, option
from ..core.sites import COMPONENTS, Site, normalise_positions
from ..errors import SiteError


def _positions(v):
    try:
        normalise_positions(v)
    except SiteError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class ReftGraphConfig(Settings):
    """The arguments of :func:`reft_graph`, with their help (also the ``graph`` section of a
    ``reftgraph train`` spec).

    >>> import reftgraph as rg
    >>> config = ReftGraphConfig(layers=[1], positions="last", rank=2)
    >>> len(reft_graph(rg.models.tiny("llama"), **config.kwargs()).nodes), ReftGraphConfig.help("rank")
    (1, 'rank of each ReFT op (rows of its projection R)')
    """

    layers: object = option("all", "layers to intervene on: 'all' or a list of ints (checked against the model)")
    positions: str = option("f5+l5", "token positions of every node: 'f5+l5' (first 5 and last 5 prompt "
                            "tokens), 'last', ...", _positions)
    rank: int = option(4, "rank of each ReFT op (rows of its projection R)", number(1, integer=True))
    op: str = option("LoReFT", "the ReFT op: LoReFT, NoReFT, DiReFT, NoDiReFT, ConsReFT or LoBiReFT",
                     one_of(*REFT_OPS))
    component: str = option("resid_post", "the component every node edits", one_of(*COMPONENTS))
    share_positions: bool = option(False, "one op for the first and the last positions of a layer", one_of(True, False))
    share_layers: bool = option(False, "one op for every layer", one_of(True, False))
    act: str = option("identity", "activation of the learned source (LoReFT's act(Wh + b))", one_of(*ACTIVATIONS))
    dropout: float = option(0.0, "dropout on the op's input while training", number(0, 1))
    seed: int = option(0, "seed of the ops' initial weights", number(0, integer=True))


def reft_graph(model, layers: Union[str, Sequence[int]] = "all", positions: str = "f5+l5", rank: int = 4,
               op: str = "LoReFT", component: str = "resid_post", share_positions: bool = False,
               share_layers: bool = False, act: str = "identity", dropout: float = 0.0, seed: int = 0) -> Graph:
    """A graph of ReFT ops: one node per layer and position group.

    >>> import reftgraph as rg
    >>> g = reft_graph(rg.models.tiny("llama"), layers=[1], positions="f2+l2", rank=2, op="DiReFT")
    >>> g.summary()[["name", "op", "positions", "params"]].values.tolist()
    [['L1_first', 'DiReFT', 'f2+l0', 130], ['L1_last', 'DiReFT', 'f0+l2', 130]]

    ``positions="fN+lM"`` with ``share_positions=False`` (the paper's untied setting) makes two
    nodes per layer, the first N and the last M prompt tokens, each with its own op;
    ``share_layers=True`` uses one op for all layers. Node names: ``L{layer}_first``,
    ``L{layer}_last`` (or ``L{layer}`` for one group).

    Layers are checked against the model here, not at the first run:

    >>> reft_graph(rg.models.tiny("llama"), layers=[0, 32])
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: reft_graph: layer 32 is out of range; tiny-llama has 2 layers: valid layers 0..1 (or -2..-1)
    """
    if op not in REFT_OPS:
        raise ValueError(f"unknown ReFT op {op!r}; choose one of {sorted(REFT_OPS)}")
    arch = model.arch
    layers = _check_layers(model, layers)
    width = arch.width(component)
    if width is None:
        raise SiteError(f"reft_graph: {component} has one entry per key token, not a fixed width; a ReFT op "
                        "edits a fixed-width representation (resid_post, head_out, ...)")
    match = re.fullmatch(r"f(\d+)\+l(\d+)", positions) if isinstance(positions, str) else None
    if match and not share_positions and all(int(x) > 0 for x in match.groups()):
        n_first, n_last = match.groups()
        groups = [("first", f"f{n_first}+l0"), ("last", f"f0+l{n_last}")]
    else:
        groups = [("", positions)]
    ops = {}
    g = Graph()
    for layer in layers:
        for i, (suffix, pos) in enumerate(groups):
            key = (None if share_layers else layer, suffix)
            if key not in ops:
                ops[key] = REFT_OPS[op](width=width, rank=rank, act=act, dropout=dropout, seed=seed + len(ops))
            name = f"L{layer}_{suffix}" if suffix else f"L{layer}"
            g.add(Site(component, layer=layer, positions=pos), ops[key], name=name)
    return g


def _check_layers(model, layers) -> list:
    """The layers as a list of ints, or a SiteError naming the first bad one and the valid range."""
    n = model.arch.n_layers
    if isinstance(layers, str) and layers == "all":
        return list(range(n))
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise SiteError(f"reft_graph: layers are a list of ints (negative from the end) or 'all'; got {layers!r}")
    checked = []
    for layer in layers:
        try:
            index = None if isinstance(layer, bool) else operator.index(layer)
        except TypeError:
            index = None
        if index is None:
            raise SiteError(f"reft_graph: layers are a list of ints (negative from the end) or 'all'; "
                            f"got {layer!r} in {layers!r}")
        layer = index
        if model.arch.layer_index(layer) is None:
            name = getattr(model, "name", None) or "the model"
            raise SiteError(f"reft_graph: layer {layer} is out of range; {name} has {n} layers: valid layers "
                            f"0..{n - 1} (or -{n}..-1)")
        checked.append(layer)
    return checked


def print_trainable_parameters(graph: Graph, model) -> str:
    """Print (and return) ``trainable intervention params: N || model params: M || trainable%: p``.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> _ = print_trainable_parameters(reft_graph(lm, layers=[0, 1], positions="last", rank=2), lm)
    trainable intervention params: 260 || model params: 32,096 || trainable%: 0.8101
    """
    n = graph.num_parameters()
    m = sum(p.numel() for p in model.hf.parameters())
    line = f"trainable intervention params: {n:,d} || model params: {m:,d} || trainable%: {100 * n / m:.4f}"
    print(line)
    return line
