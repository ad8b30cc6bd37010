"""Residual streams that are not one ``[batch, tokens, width]`` tensor: how a block's stream
is laid out, and the ``[batch, tokens, width]`` view that ``resid_pre`` / ``resid_post`` give.

>>> import torch
>>> s = Stream(perm=(1, 0, 2))        # XLNet: tokens first
>>> raw = torch.randn(6, 2, 8)         # [tokens, batch, width]
>>> s.get(raw).shape, torch.equal(s.put(raw, s.get(raw)), raw)
(torch.Size([2, 6, 8]), True)

Two layouts are read:

- **tokens first** (XLNet, FSMT): the stream is ``[tokens, batch, width]``; the view
  transposes it.
- **several streams per token** (hyper-connections: DeepSeek V4, HunYuan V4, Qwen4-exp;
  Gemma 3n's AltUp; ProphetNet's predicting streams): each token carries ``n`` vectors of
  the model width, as ``[batch, tokens, n, width]``, ``[n, batch, tokens, width]``,
  ``[batch, tokens, n * width]``, or one stream after another along the tokens
  (``[batch, n * tokens, width]``). The view puts a token's vectors side by side: one vector
  of ``n * width``, stream 0 first. ``n`` is read from the config (:data:`STREAM_COUNTS`),
  so a real model whose ``n`` differs from the tiny instance's gets its own width.

Only the stream components are defined on such a stream; sub-layer outputs, heads and the
stream's ends are refused with the layout as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["STREAM_COUNTS", "Stream", "find_stream", "layout_reason", "stream_count"]

# config fields that count a token's streams -> the streams besides those it counts (ProphetNet's
# ``ngram`` counts its predicting streams, beside the main one)
STREAM_COUNTS = {"hc_mult": 0, "hc_count": 0, "altup_num_inputs": 0, "ngram": 1}


def stream_count(config) -> tuple[str, int]:
    """``(field, n)``: the config field that counts a token's residual streams, and its value
    (``("", 1)`` when the config has none).

    >>> from transformers import AutoConfig
    >>> stream_count(AutoConfig.for_model("deepseek_v4")), stream_count(AutoConfig.for_model("llama"))
    (('hc_mult', 4), ('', 1))
    """
    get = getattr(config, "get_text_config", None)
    config = (get() if callable(get) else None) or config
    for name, more in STREAM_COUNTS.items():
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value + more > 1:
            return name, value + more
    return "", 1


@dataclass(frozen=True)
class Stream:
    """A block stream's layout: ``perm`` orders the raw tensor's axes as ``[batch, tokens, ...]``;
    the axes after those two are flattened into the view's width.

    >>> import torch
    >>> s = Stream(perm=(1, 2, 0, 3), count="altup_num_inputs")   # Gemma 3n: [n, batch, tokens, width]
    >>> raw = torch.arange(2 * 1 * 3 * 4.).view(2, 1, 3, 4)
    >>> s.get(raw)[0, 0].tolist() == raw[:, 0, 0].flatten().tolist()    # token 0: stream 0, then stream 1
    True
    """

    perm: tuple
    count: str = ""     # the config field counting a token's streams ('' for one stream)
    split: int = -1     # an axis holding the streams one after another (split first into [n, tokens])

    def _split(self, raw: torch.Tensor, n: int) -> torch.Tensor:
        return raw if self.split < 0 else raw.unflatten(self.split, (n, raw.shape[self.split] // n))

    def get(self, raw: torch.Tensor, n: int = 1) -> torch.Tensor:
        """The ``[batch, tokens, width]`` view of the raw stream of ``n`` streams per token (a
        copy where axes move).

        >>> Stream((0, 1, 2, 3)).get(torch.zeros(1, 5, 2, 3)).shape
        torch.Size([1, 5, 6])
        >>> Stream((0, 2, 1, 3), split=1).get(torch.zeros(1, 15, 3), n=3).shape    # [batch, 3 * 5 tokens, 3]
        torch.Size([1, 5, 9])
        """
        return self._split(raw, n).permute(self.perm).flatten(2)

    def put(self, raw: torch.Tensor, new: torch.Tensor, n: int = 1) -> torch.Tensor:
        """The raw stream with the view's values ``new``, laid out as ``raw`` is.

        >>> raw = torch.randn(1, 5, 2, 3)
        >>> torch.equal(Stream((0, 1, 2, 3)).put(raw, torch.ones(1, 5, 6)), torch.ones(1, 5, 2, 3))
        True
        """
        split = self._split(raw, n)
        shape = [split.shape[i] for i in self.perm]
        back = [self.perm.index(i) for i in range(len(self.perm))]
        return new.reshape(shape).permute(back).reshape(raw.shape).contiguous()

    def width(self, config, d_model: int) -> int:
        """The view's width on a model: its stream count times the model width.

        >>> from transformers import AutoConfig
        >>> Stream((0, 1, 2, 3), "hc_mult").width(AutoConfig.for_model("deepseek_v4"), 64)
        256
        """
        return self.streams(config) * d_model

    def streams(self, config) -> int:
        """How many vectors each token carries on a model with this config.

        >>> from transformers import AutoConfig
        >>> Stream((0, 2, 1, 3), "ngram", split=1).streams(AutoConfig.for_model("prophetnet"))   # main + 2 predicting
        3
        """
        return stream_count(config)[1] if self.count else 1


def find_stream(shape: tuple, batch: int, tokens: int, d_model: int, config) -> Union[Stream, str]:
    """The layout of a block stream of ``shape`` recorded on ``batch`` rows of ``tokens``
    tokens, or why none is read (a sentence).

    >>> from transformers import AutoConfig
    >>> find_stream((6, 1, 64), 1, 6, 64, AutoConfig.for_model("xlnet"))
    Stream(perm=(1, 0, 2), count='', split=-1)
    >>> find_stream((1, 6, 2, 64), 1, 6, 64, AutoConfig.for_model("deepseek_v4"))   # hc_mult = 4, 2 streams seen
    'the stream has 2 vectors per token and its config counts 4 (hc_mult)'
    """
    shape, split = tuple(shape), -1
    field, count = stream_count(config)
    if tokens not in shape and len(shape) == 3 and count * tokens in shape[1:]:   # streams one after another
        split = shape.index(count * tokens, 1)
        shape = shape[:split] + (count, tokens) + shape[split + 1:]
    if len(shape) not in (3, 4) or shape.count(tokens) != 1 or shape.count(batch) != 1 or shape[-1] % d_model:
        return f"the block's stream is {list(shape)}, which no layout reads as [batch, tokens, width]"
    b, t = shape.index(batch), shape.index(tokens)
    perm = (b, t) + tuple(i for i in range(len(shape)) if i not in (b, t))
    per_token = 1
    for i in perm[2:]:
        per_token *= shape[i]
    n = per_token // d_model
    if n == 1:
        return Stream(perm)
    if count != n:
        named = f"its config counts {count} ({field})" if field else f"its config names no count ({', '.join(STREAM_COUNTS)})"
        return f"the stream has {n} vectors per token and {named}"
    return Stream(perm, field, split)


def layout_reason(shape: tuple, stream: Stream) -> str:
    """Why the components other than the stream's are refused on a block with this layout.

    >>> layout_reason((6, 1, 64), Stream((1, 0, 2)))[:43]
    'the block stream is laid out as [6, 1, 64] '
    """
    what = (f"several vectors per token, counted by {stream.count}, viewed side by side" if stream.count
            else "tokens first, viewed as [batch, tokens, width]")
    return (f"the block stream is laid out as {list(shape)} ({what}); resid_pre and resid_post are defined on it, "
            "the components inside the block are not")

