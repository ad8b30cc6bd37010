"""The arch layer: where the canonical components live in a model, and the Model wrapper.

>>> from reftgraph.arch import tiny
>>> tiny("gpt2").arch.family.name
'gpt2'
"""

from .models import Model, load, tiny, wrap
from ..core.sites import STAGES
from .structure import FAMILIES, Arch, Family, Hook, register_family

__all__ = ["FAMILIES", "STAGES", "Arch", "Family", "Hook", "Model", "load", "register_family", "tiny", "wrap"]
