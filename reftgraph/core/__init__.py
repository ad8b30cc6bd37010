"""The core layer: sites, the graph and the ops. Pure data and math; no model code.

>>> from reftgraph.core import Graph, Site
>>> str(Site("resid_post", layer=3, positions="last"))
'resid_post[3] pos=last'
"""

from .graph import Graph, Node
from .sites import COMPONENTS, HEAD_COMPONENTS, Site

__all__ = ["COMPONENTS", "HEAD_COMPONENTS", "Graph", "Node", "Site"]
