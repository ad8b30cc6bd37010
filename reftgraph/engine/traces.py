"""One traced forward of a bound plan: the engine's single way to run a model with edits.

>>> import reftgraph as rg
>>> from reftgraph.engine import compile_graph, tokenize
>>> lm, g = rg.models.tiny("llama"), rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> out = trace(lm, compile_graph(g, lm.arch).bind(batch), inputs)
>>> out.value.shape, out.collected["m"][0].shape
(torch.Size([2, 3, 259]), torch.Size([2, 1, 32]))

What comes back is always an :class:`Outputs`; what its ``value`` holds is the request's
``output``: the logits, the final hidden state, or nothing (the model stops after the
plan's last hook). Skipping the blocks below a layer is a value too, :class:`Skip`
(a :class:`~reftgraph.engine.prefix.PrefixCache` gives one).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import nnsight
import torch

from ..arch.models import Model
from ..arch.structure import Hook
from ..errors import SiteError
from .apply import apply
from .bind import BoundPlan
from .context import attention_for, input_device, serial
from .remote import INSIDE, is_remote

__all__ = ["OUTPUTS", "Outputs", "Skip", "trace"]

OUTPUTS = ("logits", "hidden", None)


class Outputs(NamedTuple):
    """What a forward gives back: ``value`` (what the request's ``output`` names) and the
    collected nodes, ``{name: (value [B, k, ...], valid [B, k])}``.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import Batch, compile_graph
    >>> lm = rg.models.tiny("llama")
    >>> ids = lm.arch.inputs(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    >>> value, collected = trace(lm, compile_graph(rg.Graph(), lm.arch).bind(Batch.full(1, 3)), ids, output="hidden")
    >>> value.shape, collected
    (torch.Size([1, 3, 32]), {})
    """

    value: Optional[torch.Tensor]
    collected: dict


class Skip(NamedTuple):
    """Skip the blocks below ``layer``, feeding ``state`` (their output, computed earlier:
    ``[N, S, d]``) to block ``layer``.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import Batch, PrefixCache, compile_graph, tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, batch = tokenize(lm, {"base": ["hello"]})
    >>> bound = compile_graph(rg.Graph(), lm.arch).bind(batch)
    >>> skip = Skip(1, PrefixCache(lm).value(inputs, 1))
    >>> torch.allclose(trace(lm, bound, inputs, skip=skip).value, trace(lm, bound, inputs).value, atol=1e-5)
    True
    """

    layer: int
    state: torch.Tensor


def touches_logits(plan) -> bool:
    """Whether a node of ``plan`` edits or reads the logits (which then must be computed at every position).

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph
    >>> touches_logits(compile_graph(rg.Graph(), rg.models.tiny("llama").arch))
    False
    """
    return any("logits" in (s.node.site.component, s.node.reads[1].component) for s in plan.steps)


def trace(model: Model, bound: BoundPlan, inputs: dict, *, output: Optional[str] = "logits",
          skip: Optional[Skip] = None, remote=None) -> Outputs:
    """One traced forward of ``inputs`` with ``bound``'s edits.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph, tokenize
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Collect(), name="r")
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> out = trace(lm, compile_graph(g, lm.arch).bind(batch), inputs, output=None)
    >>> out.value is None, out.collected["r"][0].shape
    (True, torch.Size([2, 1, 32]))

    ``output``: ``"logits"`` (the model's logits ``[N, S, vocab]``), ``"hidden"`` (the final
    hidden state ``[N, S, d]``, after the final norm; the language-model head then runs on
    the last position only, so a loss on a few positions pays for those alone: see
    :func:`reftgraph.training.losses.lm_loss`), or None (the model stops after the plan's
    last hook: what a caller collects below the top layer costs only the blocks up to it).
    ``skip``: a :class:`Skip`. Other entries of ``inputs`` (``logits_to_keep``, a key-value
    ``cache``) go to the model. ``remote`` is set by an executor
    (:func:`reftgraph.engine.executors.executor`): the trace is then a request of its own, or
    a trace inside a remote session.
    """
    plan = bound.plan
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "hidden" and touches_logits(plan):
        raise SiteError("this graph edits or reads logits, which a run for the final hidden state (a training loss) "
                        "does not compute for every position; use logits_in (the stream before the final norm)")
    remote = remote if is_remote(remote) else None
    sent = remote is not None and remote != INSIDE   # this trace is a request of its own
    device = input_device(model, [plan], remote)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if output == "hidden" and model.arch.token_head:
        inputs["logits_to_keep"] = 1
    elif output == "logits" and not model.arch.token_head:   # an encoder without a token head: its last hidden state
        output = "hidden"
    layers = model.arch.family.layers     # the trunk: the module holding the blocks (a bare encoder: the model)
    trunk = getattr(model.nn, layers.split(".")[0]) if "." in layers else model.nn
    collected, out = {}, {}
    lock = contextlib.nullcontext() if remote == INSIDE else serial(model)
    with lock, attention_for(model, plan), model.nn.trace(inputs, **({"remote": remote} if sent else {})) as tracer:
        for layer in range(skip.layer if skip is not None else 0):
            model.arch.envoy(model.nn, Hook(layer, 0, "", "output")).skip(skip.state)
        apply(plan, bound.steps, model.nn, collected)
        if output is None:
            tracer.stop()
        elif output == "hidden":
            out["value"] = trunk.output[0]
        else:
            out["value"] = model.nn.output.logits
        if sent:   # what comes back from the server: the saved values only
            nnsight.save(collected)
            nnsight.save(out)
    return Outputs(out.get("value"), collected)
