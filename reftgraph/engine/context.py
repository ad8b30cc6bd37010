"""What a forward needs around it: a reftgraph model, its lock, its attention
implementation, its devices, and the graph's ops in eval mode.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> as_model(lm) is lm, runnable(lm), serial(lm) is serial(lm)
(True, device(type='cpu'), True)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence

import torch

from ..arch.components.pattern import eager
from ..arch.models import Model
from ..arch.structure import Hook
from ..core.graph import Graph
from ..errors import SiteError
from .plan import Plan

__all__ = ["as_model", "attention_for", "inference_mode", "input_device", "layer_device", "place", "runnable",
           "serial"]


def as_model(model, one_stack: str = "") -> Model:
    """``model`` itself when it is a :class:`Model`, else a :class:`SiteError` that says how to make one.

    >>> import reftgraph as rg
    >>> as_model(rg.models.tiny("llama").hf)      # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: expected a reftgraph Model (rg.load(...), ...), got LlamaForCausalLM

    ``one_stack`` names a call that reads one stack of blocks: it refuses an encoder-decoder.
    """
    if not isinstance(model, Model):
        raise SiteError(f"expected a reftgraph Model (rg.load(...), rg.wrap(hf_model, tokenizer)), "
                        f"got {type(model).__name__}")
    if one_stack and model.arch.stacks:
        raise SiteError(f"{one_stack} reads a model with one stack of blocks; {model.name or model.arch.family.name} "
                        "is an encoder-decoder: run graphs on it with run or generate (a site names stack='encoder', "
                        "or is in the decoder)")
    return model


def runnable(model: Model) -> torch.device:
    """The device ``model`` runs on, or a :class:`SiteError` when it has no weights (meta device).

    >>> import tempfile, reftgraph as rg
    >>> path = tempfile.mkdtemp()
    >>> rg.models.tiny_config("llama").save_pretrained(path); _ = rg.models.tiny_tokenizer().save_pretrained(path)
    >>> runnable(rg.load(path, dispatch=False))       # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: model ... has no weights (built on the meta device, rg.load(..., dispatch=False)): ...
    """
    device = model.device
    if device.type == "meta":
        raise SiteError(f"model {model.name or type(model.hf).__name__} has no weights (built on the meta device, "
                        "rg.load(..., dispatch=False)): graphs compile and are checked against it, but running "
                        "one needs the weights: rg.load(name_or_path)")
    return device


def serial(model: Model):
    """The lock that runs on ``model`` take, one at a time: a re-entrant lock kept on the
    transformers model (shared by every wrapper of it).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> serial(lm) is serial(rg.wrap(lm.hf, lm.tokenizer))
    True

    nnsight traces and forward hooks are not safe to run on one model from two threads
    at once; reftgraph serialises them, so threads sharing a model wait for each other
    (and get the results they would get alone). For parallel work, give each thread or
    process its own model.
    """
    # dict.setdefault is atomic: two threads asking first get the same lock (no global
    # registry, which would travel with every remote request that ships this module)
    lock = model.hf.__dict__.get("_reftgraph_lock")
    return lock if lock is not None else model.hf.__dict__.setdefault("_reftgraph_lock", threading.RLock())


def attention_for(model: Model, *plans):
    """The attention implementation the plans need while they run: eager when one touches
    ``attn_pattern`` (only eager attention computes the probabilities), put back after;
    else the model's own.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("attn_pattern", layer=0, head=0), rg.Collect(), name="p")
    >>> from reftgraph.engine import compile_graph
    >>> with attention_for(lm, compile_graph(g, lm.arch)):
    ...     lm.hf.config._attn_implementation
    'eager'
    >>> lm.hf.config._attn_implementation
    'sdpa'

    It also readies each module whose inner operations a plan touches (``Hook.inner``:
    nnsight's ``.source``, reached here before the trace), so that a hook earlier in the
    same module's forward cannot make the trace run past them.
    """
    for plan in plans:
        for hook in plan.hooks:
            if hook.inner:
                model.arch.envoy(model.nn, Hook(hook.layer, 0, hook.path, hook.io, root=hook.root,
                                                stack=hook.stack)).source
    if model.hf is None or not any(plan.eager for plan in plans):
        return contextlib.nullcontext()
    return eager(model.hf)


@contextlib.contextmanager
def inference_mode(graph: Graph):
    """Ops in eval mode (no dropout) for a run, their previous mode restored after.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2, dropout=0.1), name="r")
    >>> _ = g.ops.train()
    >>> with inference_mode(g):
    ...     print(g["r"].op.training)
    False
    >>> g["r"].op.training
    True
    """
    training = [m for m in graph.ops.modules() if m.training]
    for m in training:   # eval(), without a walk per module (and without bumping an op's revision)
        object.__setattr__(m, "training", False)
    try:
        yield
    finally:
        for m in training:
            object.__setattr__(m, "training", True)


def input_device(model: Model, plans: Sequence[Plan], remote=None) -> torch.device:
    """Where a forward's inputs go: the model's device, with the plans' ops placed on their
    layers' devices; the CPU for a remote call (the server holds the weights, so a model
    loaded without them works too).

    >>> import reftgraph as rg
    >>> input_device(rg.models.tiny("llama"), []), input_device(rg.models.tiny("llama"), [], remote="local")
    (device(type='cpu'), device(type='cpu'))
    """
    if remote is not None:
        return torch.device("cpu")
    device = runnable(model)
    for plan in plans:
        place(plan, model, device)
    return device


def layer_device(model: Model, layer: int, stack: str = "") -> torch.device:
    """The device block ``layer`` (of an encoder-decoder's ``stack``) computes on (under
    accelerate's device map: its execution device).

    >>> import reftgraph as rg
    >>> layer_device(rg.models.tiny("llama"), 1)
    device(type='cpu')
    """
    if not getattr(model.hf, "hf_device_map", None):   # one device: no need to look at the block
        return model.device
    block = model.arch.envoy(model.hf, Hook(layer, 0, "", "output", stack=stack))
    execution = getattr(getattr(block, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    weights = [p.device for p in block.parameters() if p.device.type != "meta"]
    return weights[0] if weights else model.device


def place(plan: Plan, model: Model, device: Optional[torch.device] = None) -> None:
    """Move each op of ``plan`` to the device of the layer it edits (once; parameters keep their identity).

    >>> import torch, reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Add(torch.zeros(32)), name="a")
    >>> from reftgraph.engine import compile_graph
    >>> place(compile_graph(g, lm.arch), lm); g["a"].op.vector.device
    device(type='cpu')

    ``device``: the model's device when the caller has it (a model on one device).
    """
    mapped = None
    for step in plan.steps:
        op = step.node.op
        # the op's own first tensor, else the first of its submodules'
        tensor = next((t for t in (*op._parameters.values(), *op._buffers.values()) if t is not None), None)
        if tensor is None:
            tensor = next(iter(op.parameters()), None)
        if tensor is None:
            tensor = next(iter(op.buffers()), None)
        if tensor is not None:
            if mapped is None:
                mapped = bool(getattr(model.hf, "hf_device_map", None))
                device = model.device if device is None and not mapped else device
            wanted = layer_device(model, step.hook.layer, step.hook.stack) if mapped else device
            if tensor.device != wanted:
                op.to(wanted)
