"""The engine layer: one way to run a graph on a model.

A graph compiles to an immutable :class:`Plan` (``compile_graph``: checked against the
model, in forward order); ``plan.bind(batch)`` resolves it against one :class:`Batch`
(a :class:`BoundPlan`); an executor (``executor(model, remote)``: here or on a remote
server) runs bound plans, one forward at a time or as :class:`Job` values, and every
forward gives back :class:`Outputs`. ``run`` and ``generate`` are what users call.

>>> import reftgraph as rg
>>> from reftgraph.engine import compile_graph, executor, tokenize
>>> lm, g = rg.models.tiny("llama"), rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> logits, collected = executor(lm).forward(compile_graph(g, lm.arch).bind(batch), inputs)
>>> logits.shape, collected["m"][0].shape
(torch.Size([2, 3, 259]), torch.Size([2, 1, 32]))

``API`` lists the names the layers above use: they import these from this package and
nothing else of the engine (a test checks it).
"""

from ..core.graph import provide
from .apply import apply
from .bind import Batch, Bound, BoundPlan, bind
from .context import as_model, inference_mode, layer_device, place, runnable
from .executors import Job, Local, Remote, executor
from .generate import Generation, generate
from .plan import Plan, Step, compile_graph
from .prefix import PrefixCache
from .prompts import Template, check_chat_template, check_template, format_prompt
from .run import RunResult, forward, forwards, run
from .tokens import last_token, prompt_list, tokenize
from .traces import Outputs, Skip, trace

provide("run", run)
provide("generate", generate)

# the engine's API for the layers above (methods, training, files, experiments, cli): they
# import these names from this package and nothing else of the engine (a test checks it)
API = ["Batch", "BoundPlan", "Generation", "Job", "Local", "Outputs", "Plan", "PrefixCache", "RunResult", "Skip",
       "Template", "as_model", "check_chat_template", "check_template", "compile_graph", "executor", "format_prompt",
       "generate", "inference_mode", "last_token", "prompt_list", "run", "runnable", "tokenize"]

# also public: the pieces under the API (the plan's steps, binding, applying edits, the one
# traced forward, devices) and the older calls ``forward`` / ``forwards``
__all__ = sorted(API + ["Bound", "Remote", "Step", "apply", "bind", "forward", "forwards", "layer_device", "place",
                        "trace"])
