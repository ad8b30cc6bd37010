"""Each component's home: one module per family of components.

>>> from reftgraph.arch.components import COMPONENT_TYPES, component
>>> [type(c).__name__ for c in COMPONENT_TYPES][:2], component("mlp_act").names
(['MixerOutput', 'Residual'], ('mlp_act',))

A :class:`~reftgraph.arch.components.base.Component` says where its components' hooks
are in a block, how to view them, their widths and heads, and proves them on a tiny
instance of each architecture (refusing, with the reason, what it cannot prove). The
proofs run the families in this order, each reading what the ones before found.

Adding a component: its name and forward stage in :mod:`reftgraph.core.sites`
(``COMPONENTS``, ``STAGES``: the graph's vocabulary), one module here with its
:class:`Component` and proof, listed in ``COMPONENT_TYPES``, and its case in the oracle
tests (docs/architecture.md, *Adding a component*).
"""

from __future__ import annotations

from .base import Address, Component, Context, first, with_first
from .ends import Ends
from .heads import Heads
from .inputs import HeadInputs, MLPInput
from .mixer import MixerOutput
from .mlp import MLPActivations
from .outputs import SublayerOutputs
from .pattern import Pattern
from .residual import Residual

__all__ = ["COMPONENT_TYPES", "Address", "Component", "Context", "component", "first", "with_first"]

COMPONENT_TYPES = (MixerOutput(), Residual(), SublayerOutputs(), MLPActivations(), Heads(), Pattern(), HeadInputs(),
                   MLPInput(), Ends())
_BY_NAME = {name: c for c in COMPONENT_TYPES for name in c.names}


def component(name: str) -> Component:
    """The :class:`Component` that serves ``name``.

    >>> component("k").has_heads, component("resid_post").has_heads
    (True, False)
    """
    return _BY_NAME[name]
