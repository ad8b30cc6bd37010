"""Frozen-prefix caching: compute the blocks below a graph's lowest edit once per input batch.

When every edit (and every source read) of a graph sits at layer ``L`` or above, the blocks
below ``L`` see the same inputs and the same frozen weights at every training step, so they
give the same activations. :class:`PrefixCache` computes block ``L - 1``'s output once per
batch content and later forwards skip the blocks below ``L`` (nnsight's module ``skip``),
feeding the stored value to block ``L``.

>>> import torch, reftgraph as rg
>>> from reftgraph.engine import compile_graph, executor, tokenize
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.ConsReFT(width=32, rank=1))
>>> plan = compile_graph(g, lm.arch)
>>> inputs, batch = tokenize(lm, {"base": ["hello", "hi"]})
>>> cache, ex = PrefixCache(lm), executor(lm)
>>> cached = ex.forward(plan.bind(batch), inputs, skip=cache.skip(plan, inputs)).value
>>> plain = ex.forward(plan.bind(batch), inputs).value
>>> torch.allclose(cached, plain, atol=1e-5), cache.first_layer(plan), cache.misses
(True, 1, 1)

An entry is keyed by a hash of the input tensors (ids, mask, positions) and ``L``: other
inputs, or a graph whose lowest edit moves, make a new entry; the cache is tied to one
model and refuses another (or a model in training mode, whose dropout would differ).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import torch

from ..arch.structure import Hook
from .bind import Batch
from .context import as_model, serial
from .plan import Plan
from .traces import Skip


def first_layer(plan: Plan) -> int:
    """The lowest layer any edit or source read of ``plan`` touches (``n_layers`` if none).

    >>> import reftgraph as rg
    >>> from reftgraph.engine.plan import compile_graph
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.ConsReFT(width=32, rank=1))
    >>> first_layer(compile_graph(g, lm.arch))
    1
    """
    return min((h.layer for h in plan.hooks), default=plan.arch.n_layers)


def input_key(inputs: dict, layer: int) -> str:
    """A hash of the input tensors (names, shapes, dtypes, values) and ``layer``.

    >>> import torch
    >>> ids = {"input_ids": torch.tensor([[1, 2, 3]])}
    >>> input_key(ids, 2) == input_key({"input_ids": torch.tensor([[1, 2, 3]])}, 2), input_key(ids, 2) == input_key(ids, 3)
    (True, False)
    """
    digest = hashlib.sha256(f"layer={layer}".encode())
    for name in sorted(inputs):
        value = inputs[name]
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.numpy().tobytes())
        else:
            digest.update(f"{name}={value!r}".encode())
    return digest.hexdigest()


class _Stop(Exception):
    pass


def prefix_state(model, inputs: dict, layer: int) -> torch.Tensor:
    """The output of block ``layer - 1`` for ``inputs``, without running the blocks above it.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, _ = tokenize(lm, {"base": ["hello"]})
    >>> prefix_state(lm, inputs, 1).shape
    torch.Size([1, 5, 32])
    """
    model = as_model(model, one_stack="prefix_state")
    if not 0 < layer <= model.arch.n_layers:
        raise ValueError(f"prefix layer {layer} out of range; valid 1..{model.arch.n_layers}")
    got = {}

    def stop(module, args, output):
        got["value"] = output
        raise _Stop

    with serial(model):   # the hook must not catch another thread's forward
        handle = model.arch.envoy(model.hf, Hook(layer - 1, 0, "", "output")).register_forward_hook(stop)
        try:
            with torch.no_grad():
                model.hf(**{k: v.to(model.device) for k, v in inputs.items()})
        except _Stop:
            pass
        finally:
            handle.remove()
    return got["value"]


class PrefixCache:
    """Block outputs below a graph's lowest edit, one entry per input batch (newest ``max_entries``).

    >>> import reftgraph as rg
    >>> cache = PrefixCache(rg.models.tiny("llama"), max_entries=4)
    >>> len(cache), cache.hits, cache.misses
    (0, 0, 0)

    ``cache.skip(plan, inputs)`` is the :class:`~reftgraph.engine.traces.Skip` of a forward:
    with it, the forward equals the uncached one (values and gradients) and runs only the
    blocks from the graph's lowest edited layer on. A plan that edits layer 0 has nothing
    to skip (None).
    """

    def __init__(self, model, max_entries: Optional[int] = None):
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be None or >= 1, got {max_entries}")
        self.model = as_model(model, one_stack="PrefixCache")
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    first_layer = staticmethod(first_layer)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        """Drop every stored entry (hit and miss counts are kept).

        >>> import reftgraph as rg
        >>> cache = PrefixCache(rg.models.tiny("llama"))
        >>> cache.clear(); len(cache)
        0
        """
        self.entries.clear()

    def value(self, inputs: dict, layer: int) -> torch.Tensor:
        """The stored block ``layer - 1`` output for ``inputs``, computed on a miss.

        >>> import reftgraph as rg
        >>> from reftgraph.engine import tokenize
        >>> cache = PrefixCache(rg.models.tiny("llama"))
        >>> inputs, _ = tokenize(cache.model, {"base": ["hello"]})
        >>> cache.value(inputs, 1).shape, cache.value(inputs, 1) is cache.value(inputs, 1), cache.misses
        (torch.Size([1, 5, 32]), True, 1)
        """
        if self.model.hf.training:
            raise ValueError("the prefix cache needs the language model in eval mode (dropout changes "
                             "its activations every step); call model.hf.eval()")
        key = input_key(inputs, layer)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = prefix_state(self.model, inputs, layer)
        self.entries[key] = value
        if self.max_entries is not None and len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def skip(self, plan: Plan, inputs: dict) -> Optional[Skip]:
        """The blocks a forward of ``plan`` on ``inputs`` can skip, with their stored output
        (computed on a miss); None when the plan edits layer 0.

        >>> import reftgraph as rg
        >>> from reftgraph.engine import compile_graph, tokenize
        >>> lm = rg.models.tiny("llama")
        >>> g = rg.Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.ConsReFT(width=32, rank=1))
        >>> inputs, _ = tokenize(lm, {"base": ["hello"]})
        >>> skip = PrefixCache(lm).skip(compile_graph(g, lm.arch), inputs)
        >>> skip.layer, skip.state.shape
        (1, torch.Size([1, 5, 32]))
        """
        if plan.arch is not self.model.arch and plan.arch != self.model.arch:
            raise ValueError("the plan was compiled for another model than this PrefixCache's")
        layer = first_layer(plan)
        if layer == 0:
            return None
        layer = min(layer, self.model.arch.n_layers)
        return Skip(layer, self.value(inputs, layer))

    def forward(self, plan: Plan, inputs: dict, batch: Batch, hidden: bool = False, model=None, subspaces=None):
        """The older call: ``(value, collected)`` of a forward with :meth:`skip` (warns once).

        >>> import warnings, torch, reftgraph as rg
        >>> from reftgraph.engine import compile_graph, tokenize
        >>> lm = rg.models.tiny("llama")
        >>> inputs, batch = tokenize(lm, {"base": ["hello"]})
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     logits, _ = PrefixCache(lm).forward(compile_graph(rg.Graph(), lm.arch), inputs, batch)
        >>> logits.shape[:2]
        torch.Size([1, 5])

        Today: ``executor(model).forward(plan.bind(batch), inputs, skip=cache.skip(plan, inputs))``.
        """
        from .run import forward

        if model is not None and model is not self.model:
            raise ValueError("this PrefixCache holds activations of another model; make one per model")
        return forward(plan, self.model, inputs, batch, hidden=hidden, cache=self, subspaces=subspaces)
