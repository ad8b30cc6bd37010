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
``training`` (the one loop), ``methods``, ``datasets``, ``experiments`` and ``cli``; each
imports only the layers below it.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys

import warnings as _warnings

with _warnings.catch_warnings():   # transformers imports tqdm.auto, which warns in Jupyter without ipywidgets
    _warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

from . import datasets, errors
from .arch import Family, Model, load, models, register_family, wrap
from .core import COMPONENTS, Graph, Node, Site
from .core.ops import (Ablate, Add, Classify, Collect, ConsReFT, Dictionary, DiReFT, LoBiReFT, LoReFT, NoDiReFT,
                       NoReFT, Op, Patch, ReFT, Rotate, Set, register_op)
from .engine import Generation, PrefixCache, RunResult, generate, prefix, run
from .errors import DataError, DictionaryFileError, GraphFileError, ModelNotFound, ReftgraphError, RemoteError, SiteError, SpecError
from .files import from_pyreft, load_graph, save
from .viz import plot
from .training import data, train
from .methods import causal, circuits, das, features, memorisation, patching, steering, subspace
from .methods.reft import print_trainable_parameters, reft_graph
from . import experiments

# Module paths of the flat layout before the layers (documented, used in notebooks): each
# old name is the module that holds its contents now. They still import (and so does any
# module below one, e.g. ``reftgraph.compile.plan``), each with a DeprecationWarning the first
# time, naming the new path; so do the old names as attributes (``rg.compile``) that the
# package does not bind itself. Paths under an exported module (``reftgraph.patching.sweeps``,
# as ``rg.patching``) are the short paths of the public API and do not warn.
_OLD_PATHS = {
    "sites": "core.sites", "graph": "core.graph", "ops": "core.ops", "ops.base": "core.ops.base",
    "ops.basic": "core.ops.basic", "ops.reft": "core.ops.reft", "ops.rotate": "core.ops.rotate",
    "models": "arch.models", "hub": "arch.hub", "compile": "engine", "runtime": "engine.run",
    "generation": "engine.generate", "prefix": "engine.prefix", "data": "training.data",
    "reft": "methods.reft", "das": "methods.das", "memorisation": "methods.memorisation",
    "causal": "methods.causal", "subspace": "methods.subspace", "patching": "methods.patching",
    "patching.data": "training.counterfactual", "patching.metrics": "methods.patching.metrics",
    "patching.sweeps": "methods.patching.sweeps", "patching.paths": "methods.patching.paths",
    "patching.plot": "viz.patching", "io": "files.io", "pyreft": "files.pyreft", "plot": "viz.plot",
    "spec": "cli.spec",
}
_warned_old_paths: set = set()


def _new_path(old: str):
    """The module path (under the package) that the old path ``old`` names now, or None."""
    parts = old.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in _OLD_PATHS:
            return ".".join([_OLD_PATHS[head], *parts[cut:]])
    return None


def _is_public(old: str) -> bool:
    """Whether ``old`` starts with a module the package exports (``reftgraph.patching``,
    ``reftgraph.das``, ...): a short path users write as they write ``rg.patching``, not an old one."""
    return isinstance(globals().get(old.split(".")[0]), type(_sys)) and old.split(".")[0] in __all__


def _old_module(old: str):
    """The module at the old path ``old``, warning the first time an old path is used (short
    paths of exported modules never warn: :func:`_is_public`)."""
    module = _importlib.import_module(f"{__name__}.{_new_path(old)}")
    if old not in _warned_old_paths and not _is_public(old):
        _warned_old_paths.add(old)
        _warnings.warn(f"{__name__}.{old} is an old module path; use {module.__name__}", DeprecationWarning,
                       stacklevel=3)
    return module


class _OldPathFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Imports an old path as the module that holds its contents now (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix = __name__ + "."
        if not fullname.startswith(prefix) or _new_path(fullname[len(prefix):]) is None:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = _old_module(spec.name[len(__name__) + 1:])
        spec.loader_state = module.__spec__   # the import system sets module.__spec__ = spec next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state   # it ran already, under its new path


_sys.meta_path[:] = [f for f in _sys.meta_path if type(f).__module__ != __name__]   # one, after a reload
_sys.meta_path.insert(0, _OldPathFinder())   # before the path finder, which would load a file a second time


def __getattr__(name: str):
    if name in _OLD_PATHS:   # an old name the package does not bind, e.g. ``rg.compile``
        module = _old_module(name)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Ablate", "Add", "Classify", "Collect", "COMPONENTS", "ConsReFT", "DataError", "Dictionary",
    "DictionaryFileError", "DiReFT", "Family", "Generation",
    "Graph", "GraphFileError", "LoBiReFT", "ModelNotFound", "LoReFT", "Model", "NoDiReFT", "NoReFT", "Node", "Op", "Patch",
    "PrefixCache", "ReFT", "ReftgraphError", "RemoteError", "Rotate", "RunResult", "Set", "Site", "SiteError", "SpecError", "causal",
    "circuits",
    "das", "data", "datasets", "errors", "experiments", "features", "from_pyreft", "generate", "load", "load_graph", "memorisation", "models",
    "patching", "prefix", "print_trainable_parameters", "reft_graph", "register_family", "register_op", "run", "save", "steering",
    "subspace", "train", "wrap",
]
