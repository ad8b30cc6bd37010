"""Node ops. Each is a ``torch.nn.Module`` acting on the selected slice of a site.

>>> import reftgraph as rg
>>> sorted(rg.core.ops.OPS)[:3]
['Ablate', 'Add', 'Classify']

``OPS`` maps the name a saved graph writes (the class name) to the class that
:func:`reftgraph.load_graph` builds; :func:`register_op` adds an op of your own.
"""

from ...errors import ReftgraphError
from .base import Op
from .basic import Ablate, Add, Classify, Collect, Patch, Set, Without
from .dictionary import Dictionary
from .reft import REFT_OPS, ConsReFT, DiReFT, LoBiReFT, LoReFT, NoDiReFT, NoReFT, ReFT
from .rotate import Rotate

OPS = {cls.__name__: cls for cls in (Ablate, Add, Classify, Collect, Dictionary, Patch, Rotate, Set, Without,
                                     *REFT_OPS.values())}


def register_op(cls):
    """Register an op class under its class name, so that graphs holding it can be saved
    and loaded; returns the class (use it as a decorator).

    >>> import torch, reftgraph as rg
    >>> @register_op
    ... class Shift(rg.Op):
    ...     def __init__(self, by: float = 1.0):
    ...         super().__init__()
    ...         self.by = by
    ...     def config(self):
    ...         return {"by": self.by}
    ...     def forward(self, h, source=None, valid=None):
    ...         return h + self.by
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), Shift(by=2.0), name="shift")
    >>> import tempfile
    >>> rg.load_graph(rg.save(g, tempfile.mkdtemp() + "/g"))["shift"].op.by
    2.0
    >>> _ = OPS.pop("Shift")    # (unregistered again, for the other examples)

    ``load_graph`` builds a registered op with the keyword arguments its ``config()``
    returns (JSON numbers, strings, bools, null, a site, or an op inside the op) and the
    tensors of its state dict that are constructor arguments, then loads its state dict.
    A class whose name is registered already (to another class), or that is not a
    subclass of :class:`Op`, is refused. Registering the same class again does nothing.
    """
    if not isinstance(cls, type) or not issubclass(cls, Op) or cls is Op:
        raise ReftgraphError(f"register_op takes a subclass of reftgraph.Op, got {cls!r}")
    known = OPS.get(cls.__name__)
    if known is not None and known is not cls:
        raise ReftgraphError(f"an op named {cls.__name__!r} is registered already ({known.__module__}."
                             f"{known.__qualname__}); saved graphs name ops by class name, so give "
                             f"{cls.__module__}.{cls.__qualname__} another name")
    OPS[cls.__name__] = cls
    return cls


__all__ = ["OPS", "Op", "register_op", "Ablate", "Add", "Classify", "Collect", "Dictionary", "Patch", "Rotate", "Set", "Without",
           "ReFT", "LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT"]
