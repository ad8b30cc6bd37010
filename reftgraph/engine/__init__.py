"""The engine layer: one way to run a graph on a model.

``compile_graph`` (plan: check + forward order), ``bind`` (positions against one batch),
``apply`` (the nnsight edits); ``forward`` runs one traced forward with a plan (and the
frozen-prefix layer skip), ``run`` and ``generate`` are what users call.

>>> import reftgraph as rg
>>> from reftgraph.engine import compile_graph, forward, tokenize
>>> lm, g = rg.models.tiny("llama"), rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> logits, collected = forward(compile_graph(g, lm.arch), lm, inputs, batch)
>>> logits.shape, collected["m"][0].shape
(torch.Size([2, 3, 259]), torch.Size([2, 1, 32]))
"""

from ..core.graph import provide
from .apply import apply
from .bind import Batch, Bound, bind
from .generate import Generation, generate
from .plan import Plan, Step, compile_graph
from .prefix import PrefixCache
from .run import RunResult, as_model, forward, forwards, inference_mode, layer_device, place, run, tokenize

provide("run", run)
provide("generate", generate)

__all__ = ["Batch", "Bound", "Generation", "Plan", "PrefixCache", "RunResult", "Step", "apply", "as_model", "bind",
           "compile_graph", "forward", "forwards", "generate", "inference_mode", "layer_device", "place", "run", "tokenize"]
