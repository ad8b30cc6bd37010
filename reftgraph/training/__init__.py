"""The training layer: the one loop (:func:`fit`), losses, checkpoints and training data.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
>>> history = rg.train(g, lm, rg.data.PromptResponse([("ab", "cd")]), epochs=2, progress=False)
>>> len(history)
2
"""

from . import data
from .config import TrainConfig
from .loop import Callback, State, fit
from .losses import case_groups, kl_to_base
from .supervised import NonFiniteLoss, evaluate, final_hidden, latest_checkpoint, lm_loss, train

__all__ = ["Callback", "NonFiniteLoss", "State", "TrainConfig", "case_groups", "data", "evaluate", "final_hidden",
           "fit", "kl_to_base", "latest_checkpoint", "lm_loss", "train"]
