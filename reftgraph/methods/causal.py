"""A causal model small enough to read: variables, their functions, and counterfactual
pairs made by interchanging a variable.

State the hypothesis once; get training and evaluation data for DAS from it.

>>> from reftgraph.methods.causal import CausalModel
>>> m = CausalModel({"a": None, "b": None, "c": None, "d": None,
...                  "wx": lambda a, b: a == b, "yz": lambda c, d: c == d,
...                  "out": lambda wx, yz: wx == yz})
>>> m.inputs, m.output
(['a', 'b', 'c', 'd'], 'out')
>>> base, source = dict(a=1, b=1, c=2, d=3), dict(a=1, b=2, c=3, d=3)
>>> m.run(base)["out"], m.interchange(base, source, ["wx"])["out"]
(False, True)

A variable whose function is ``None`` is an input; a function's argument names are its
parents. ``interchange`` sets variables to the values they take on the source input
(Geiger et al.'s interchange intervention on the causal model).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import networkx as nx


@dataclass(frozen=True)
class Pair:
    """One counterfactual: ``base`` and ``source`` inputs, the interchanged ``variables``,
    the base's own output and the output after the interchange (``label``).

    >>> m = CausalModel({"x": None, "y": None, "out": lambda x, y: x + y})
    >>> m.pairs(lambda rng: {"x": rng.randint(0, 9), "y": 1}, ["x"], 1, seed=1)[0]
    Pair(base={'x': 2, 'y': 1}, source={'x': 9, 'y': 1}, variables=('x',), base_output=3, label=10)
    """

    base: dict
    source: dict
    variables: tuple
    base_output: object
    label: object

    @property
    def type(self) -> str:
        """The counterfactual type: the interchanged variables joined by ``+``.

        >>> Pair({"a": 1}, {"a": 2}, ("a", "b"), base_output=0, label=1).type
        'a+b'
        """
        return "+".join(self.variables)


class CausalModel:
    """Variables -> functions of their parents (``None`` for inputs); ``output`` defaults to
    the last variable in topological order.

    >>> m = CausalModel({"x": None, "y": None, "s": lambda x, y: x + y, "big": lambda s: s > 5})
    >>> m.inputs, m.parents["big"], m.output
    (['x', 'y'], ['s'], 'big')
    """

    def __init__(self, functions: dict, output: Optional[str] = None):
        self.functions = dict(functions)
        self.parents = {}
        dag = nx.DiGraph()
        for name, fn in self.functions.items():
            dag.add_node(name)
            parents = [] if fn is None else list(inspect.signature(fn).parameters)
            for p in parents:
                if p not in self.functions:
                    raise ValueError(f"variable {name!r}: parent {p!r} is not a variable "
                                     f"(variables: {list(self.functions)})")
                dag.add_edge(p, name)
            self.parents[name] = parents
        if not nx.is_directed_acyclic_graph(dag):
            raise ValueError(f"the causal model has a cycle: {nx.find_cycle(dag)}")
        self.dag = dag
        self.order = list(nx.lexicographical_topological_sort(dag, key=list(self.functions).index))
        self.inputs = [v for v in self.order if self.functions[v] is None]
        self.output = output or self.order[-1]
        if self.output not in self.functions:
            raise ValueError(f"output {self.output!r} is not a variable (variables: {list(self.functions)})")

    def _check(self, names, what: str) -> None:
        bad = [n for n in names if n not in self.functions]
        if bad:
            raise ValueError(f"{what} {bad[0]!r} is not a variable (variables: {list(self.functions)})")

    def run(self, inputs: dict, interventions: Optional[dict] = None) -> dict:
        """Every variable's value on ``inputs``, with ``interventions`` ({variable: value}) held fixed.

        >>> m = CausalModel({"x": None, "y": None, "s": lambda x, y: x + y, "big": lambda s: s > 5})
        >>> m.run({"x": 1, "y": 2}), m.run({"x": 1, "y": 2}, {"s": 9})["big"]
        ({'x': 1, 'y': 2, 's': 3, 'big': False}, True)
        """
        missing = [v for v in self.inputs if v not in inputs and v not in (interventions or {})]
        if missing:
            raise ValueError(f"missing inputs {missing} (inputs: {self.inputs})")
        self._check(interventions or {}, "intervened variable")
        values = {}
        for v in self.order:
            if interventions and v in interventions:
                values[v] = interventions[v]
            elif self.functions[v] is None:
                values[v] = inputs[v]
            else:
                values[v] = self.functions[v](*(values[p] for p in self.parents[v]))
        return values

    def interchange(self, base: dict, source: dict, variables: Sequence[str]) -> dict:
        """Run ``base`` with ``variables`` set to their values on ``source``.

        >>> m = CausalModel({"x": None, "y": None, "s": lambda x, y: x + y, "big": lambda s: s > 5})
        >>> m.interchange({"x": 1, "y": 2}, {"x": 4, "y": 4}, ["s"])
        {'x': 1, 'y': 2, 's': 8, 'big': True}
        """
        self._check(variables, "variable")
        on_source = self.run(source)
        return self.run(base, {v: on_source[v] for v in variables})

    def pairs(self, sample: Callable, variables: Sequence, n: int, seed: int = 0,
              changed_only: bool = False) -> list:
        """``n`` counterfactual :class:`Pair` s: ``sample(rng)`` draws one input dict.

        >>> m = CausalModel({"x": None, "y": None, "out": lambda x, y: x and y})
        >>> p = m.pairs(lambda rng: {"x": rng.random() < .5, "y": True}, ["x"], 1, seed=3)[0]
        >>> (p.type, p.label == p.source["x"])
        ('x', True)

        ``variables`` lists what to interchange (a name, or a tuple of names interchanged
        together), cycled so every type gets ``n / len(variables)`` pairs. With
        ``changed_only`` only pairs whose output the interchange changes are kept."""
        groups = [(v,) if isinstance(v, str) else tuple(v) for v in variables]
        for g in groups:
            self._check(g, "variable")
        rng = random.Random(seed)
        out, tries = [], 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"could not draw {n} pairs whose output changes; got {len(out)}")
            group = groups[len(out) % len(groups)]
            base, source = sample(rng), sample(rng)
            before = self.run(base)[self.output]
            label = self.interchange(base, source, group)[self.output]
            if changed_only and label == before:
                continue
            out.append(Pair(base, source, group, before, label))
        return out

    def dataset(self, pairs: Sequence[Pair], prompt: Callable, answer: Callable = str):
        """A :class:`reftgraph.patching.Counterfactual` for language models, one row per pair.

        >>> m = CausalModel({"x": None, "y": None, "out": lambda x, y: x + y})
        >>> pairs = m.pairs(lambda rng: {"x": rng.randint(0, 4), "y": 2}, ["x"], 2, seed=1)
        >>> data = m.dataset(pairs, prompt=lambda v: f"{v['x']}+{v['y']}=")
        >>> data.base, data.source, data.correct, data.wrong, data.meta[0]
        (['1+2=', '0+2='], ['4+2=', '2+2='], ['6', '4'], ['3', '2'], {'type': 'x'})

        ``prompt(inputs)`` makes each text, ``answer(label)`` the expected next token
        (``correct``; ``wrong`` is the base's own answer); ``meta`` rows hold the pair's ``type``.
        """
        from ..training.counterfactual import Counterfactual

        return Counterfactual([prompt(p.base) for p in pairs], [prompt(p.source) for p in pairs],
                              correct=[answer(p.label) for p in pairs],
                              wrong=[answer(p.base_output) for p in pairs],
                              meta=[{"type": p.type} for p in pairs])
