"""reftgraph: interventions on language models as nodes of a causal graph.

>>> import torch, reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(torch.ones(32), scale=2.0))
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m1")
>>> g.run(lm, ["hello", "hi there"])["m1"].shape
torch.Size([2, 1, 32])

The package is layered (docs/architecture.md): ``core`` (sites, graph, ops), ``arch``
(model structure), ``engine`` (plan, bind, apply, run, generate), ``files``, ``viz``,
``training`` (the one loop), ``methods`` and ``cli``; each imports only the layers below it.
"""

import importlib as _importlib
import sys as _sys

import warnings as _warnings

with _warnings.catch_warnings():   # transformers imports tqdm.auto, which warns in Jupyter without ipywidgets
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

from . import datasets, errors
from .arch import Family, Model, load, models, register_family, wrap
from .core import COMPONENTS, Graph, Node, Site
from .core.ops import (Ablate, Add, Classify, Collect, ConsReFT, DiReFT, LoBiReFT, LoReFT, NoDiReFT, NoReFT, Op,
                       Patch, ReFT, Rotate, Set, register_op)
from .engine import Generation, PrefixCache, RunResult, generate, prefix, run
from .errors import DataError, GraphFileError, ModelNotFound, ReftgraphError, RemoteError, SiteError, SpecError
from .files import from_pyreft, load_graph, save
from .viz import plot
from .training import data, train
from .methods import causal, circuits, das, memorisation, patching, steering, subspace
from .methods.reft import print_trainable_parameters, reft_graph

# Module paths of the flat layout before the layers (documented, used in notebooks): each
# old name is the module that holds its contents now.
_OLD_PATHS = {
    "sites": "core.sites", "graph": "core.graph", "ops": "core.ops", "ops.base": "core.ops.base",
    "ops.basic": "core.ops.basic", "ops.reft": "core.ops.reft", "ops.rotate": "core.ops.rotate",
    "models": "arch.models", "hub": "arch.hub", "compile": "engine", "runtime": "engine.run",
    "generation": "engine.generate", "prefix": "engine.prefix", "data": "training.data", "training": "training",
    "reft": "methods.reft", "das": "methods.das", "memorisation": "methods.memorisation",
    "causal": "methods.causal", "subspace": "methods.subspace", "patching": "methods.patching",
    "patching.data": "methods.patching.data", "patching.metrics": "methods.patching.metrics",
    "patching.sweeps": "methods.patching.sweeps", "patching.paths": "methods.patching.paths",
    "patching.plot": "viz.patching", "io": "files.io", "pyreft": "files.pyreft", "plot": "viz.plot",
    "spec": "cli.spec",
}
for _old, _new in _OLD_PATHS.items():
    _module = _sys.modules.setdefault(f"{__name__}.{_old}", _importlib.import_module(f"{__name__}.{_new}"))
    if "." not in _old:
        globals().setdefault(_old, _module)

__all__ = [
    "Ablate", "Add", "Classify", "Collect", "COMPONENTS", "ConsReFT", "DataError", "DiReFT", "Family", "Generation",
    "Graph", "GraphFileError", "LoBiReFT", "ModelNotFound", "LoReFT", "Model", "NoDiReFT", "NoReFT", "Node", "Op", "Patch",
    "PrefixCache", "ReFT", "ReftgraphError", "RemoteError", "Rotate", "RunResult", "Set", "Site", "SiteError", "SpecError", "causal",
    "circuits",
    "das", "data", "datasets", "errors", "from_pyreft", "generate", "load", "load_graph", "memorisation", "models",
    "patching", "prefix", "print_trainable_parameters", "reft_graph", "register_family", "register_op", "run", "save", "steering",
    "subspace", "train", "wrap",
]
