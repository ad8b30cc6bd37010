"""The settings of :func:`reftgraph.train`, as a value with help text (also the ``train``
section of a ``reftgraph train`` spec).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
>>> config = TrainConfig(epochs=2, lr=1e-2)
>>> len(rg.train(g, lm, rg.data.PromptResponse([("ab", "cd")]), progress=False, **config.kwargs()))
2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.settings import Settings, number, one_of, option

__all__ = ["TrainConfig"]

_POSITIVE = number(1, integer=True)


@dataclass(frozen=True)
class TrainConfig(Settings):
    """The arguments of :func:`reftgraph.train` that a spec or a notebook sets, with their help.

    >>> TrainConfig().epochs, TrainConfig().padding_side, TrainConfig.help("warmup")
    (3, 'right', 'warm-up: a share of the steps (< 1) or a number of steps')
    """

    epochs: int = option(3, "passes over the data", _POSITIVE)
    batch_size: int = option(8, "rows per batch", _POSITIVE)
    lr: float = option(4e-3, "peak learning rate of AdamW (linear warm-up, then linear decay to zero)",
                       number(0, low_open=True))
    weight_decay: float = option(0.0, "AdamW weight decay", number(0))
    warmup: float = option(0.1, "warm-up: a share of the steps (< 1) or a number of steps", number(0))
    grad_accum: int = option(1, "batches per optimizer step", _POSITIVE)
    seed: int = option(0, "seed of the data order and of dropout", number(0, integer=True))
    max_grad_norm: Optional[float] = option(1.0, "clip the gradient norm to this (null: no clipping)",
                                            number(0, low_open=True, none_ok=True))
    max_length: Optional[int] = option(None, "truncate rows to this many tokens (null: no limit)",
                                       number(1, integer=True, none_ok=True))
    padding_side: str = option("right", "where batches are padded", one_of("left", "right"))
    kl_weight: float = option(0.0, "weight of the KL to the unedited model on response tokens (0: none): keeps "
                              "what the graph should not change", number(0))
    kl_groups: Optional[str] = option(None, "null, or 'case': tokens that differ only in case are one outcome "
                                      "in the KL", lambda v: None if v in (None, "case") else
                                      f"must be null or 'case', got {v!r}")
