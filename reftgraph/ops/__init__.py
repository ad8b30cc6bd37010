"""Node ops. Each is a ``torch.nn.Module`` acting on the selected slice of a site."""

from .base import Op
from .basic import Ablate, Add, Collect, Patch, Set

__all__ = ["Op", "Ablate", "Add", "Collect", "Patch", "Set"]
