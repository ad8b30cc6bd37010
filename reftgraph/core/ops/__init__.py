"""Node ops. Each is a ``torch.nn.Module`` acting on the selected slice of a site."""

from .base import Op
from .basic import Ablate, Add, Classify, Collect, Patch, Set, Without
from .reft import REFT_OPS, ConsReFT, DiReFT, LoBiReFT, LoReFT, NoDiReFT, NoReFT, ReFT
from .rotate import Rotate

OPS = {cls.__name__: cls for cls in (Ablate, Add, Classify, Collect, Patch, Rotate, Set, Without, *REFT_OPS.values())}

__all__ = ["OPS", "Op", "Ablate", "Add", "Classify", "Collect", "Patch", "Rotate", "Set", "Without",
           "ReFT", "LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT"]
