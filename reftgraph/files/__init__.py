"""The files layer: graph folders (graph.json + weights.safetensors, in versions), atomic writes, pyreft import.

>>> import tempfile, reftgraph as rg
>>> from reftgraph.files import current_folder, save
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2))
>>> path = save(g, tempfile.mkdtemp() + "/g")
>>> sorted(p.name for p in path.iterdir()), sorted(p.name for p in current_folder(path).iterdir())
(['CURRENT', 'versions'], ['graph.json', 'weights.safetensors'])
"""

from ..core.graph import provide
from .io import load_graph, load_weights, save, write_graph
from .pyreft import from_pyreft
from .versions import atomic_dir, current_folder

provide("save", save)

__all__ = ["atomic_dir", "current_folder", "from_pyreft", "load_graph", "load_weights", "save", "write_graph"]
