"""reftgraph: interventions on language models as nodes of a causal graph.

>>> import torch, reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(torch.ones(32), scale=2.0))
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m1")
>>> g.run(lm, ["hello", "hi there"])["m1"].shape
torch.Size([2, 1, 32])
"""

from . import causal, das, data, memorisation, models, patching, prefix, subspace
from .arch import Family, register_family
from .graph import Graph, Node
from .io import load_graph, save
from .models import Model, load, wrap
from .ops import Ablate, Add, Classify, Collect, ConsReFT, DiReFT, LoBiReFT, LoReFT, NoDiReFT, NoReFT, Op, Patch, ReFT, Rotate, Set
from .generation import Generation, generate
from .pyreft import from_pyreft
from .prefix import PrefixCache
from .reft import print_trainable_parameters, reft_graph
from .runtime import RunResult, run
from .training import train
from .sites import COMPONENTS, Site, SiteError

__all__ = [
    "Ablate", "Add", "Classify", "Collect", "COMPONENTS", "ConsReFT", "DiReFT", "LoBiReFT", "LoReFT", "NoDiReFT",
    "NoReFT", "ReFT", "Family", "Generation", "Graph", "Model", "Node", "Op", "Patch",
    "RunResult", "Rotate", "Set", "causal", "das", "subspace", "Site", "SiteError", "data", "memorisation", "patching", "prefix", "PrefixCache", "from_pyreft", "generate", "load", "load_graph", "models", "save", "print_trainable_parameters", "reft_graph", "register_family", "run", "train", "wrap",
]
