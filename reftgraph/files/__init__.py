"""The files layer: atomic writes, graph folders (graph.json + weights.safetensors), pyreft import.

>>> import os, tempfile, reftgraph as rg
>>> from reftgraph.files import save
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
>>> sorted(os.listdir(save(g, tempfile.mkdtemp() + "/g")))
['graph.json', 'weights.safetensors']
"""

from ..core.graph import provide
from .io import atomic_dir, load_graph, load_weights, save, write_graph
from .pyreft import from_pyreft

provide("save", save)

__all__ = ["atomic_dir", "from_pyreft", "load_graph", "load_weights", "save", "write_graph"]
