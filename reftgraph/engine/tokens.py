"""Prompts to one padded batch: every stream's rows, and where each row's prompt sits.

>>> import reftgraph as rg
>>> inputs, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "cde"], "source": ["x"]})
>>> inputs["input_ids"].shape, batch.rows["source"], batch.length.tolist()
(torch.Size([3, 3]), slice(2, 3, None), [2, 3, 1])
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch

from ..arch.models import Model
from ..errors import DataError
from .bind import Batch

__all__ = ["Prompts", "from_inputs", "last_token", "prompt_list", "tokenize", "with_decoder"]

Prompts = Union[str, Sequence[str]]

# the last tokenized batches per tokenizer: a graph run again on the same prompts skips the tokenizer
_TOKENIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_TOKENIZED = 32


def prompt_list(prompts: Prompts, what: str) -> list:
    """``prompts`` as a list of strings (one string is a list of one), else a DataError.

    >>> prompt_list("hi", "prompts"), prompt_list(("a", "b"), "prompts")
    (['hi'], ['a', 'b'])
    """
    if isinstance(prompts, str):
        return [prompts]
    given = type(prompts).__name__
    prompts = list(prompts) if hasattr(prompts, "__iter__") and not isinstance(prompts, dict) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)][:1]
        raise DataError(f"{what} must be a non-empty list of strings, got {given}"
                        + (f" holding a {bad[0]}" if bad else " (empty)" if given in ("list", "tuple") else ""))
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{what}[{i}] is not valid text: {e.reason} at character {e.start} "
                            f"({p[e.start]!r}); a lone surrogate cannot be tokenized") from None
    return prompts


def from_inputs(model: Model, given) -> tuple[dict, Batch]:
    """Model inputs made elsewhere (a processor's: ``input_ids``, ``attention_mask``, and
    ``pixel_values`` and the like, passed through) as one batch; returns (inputs, Batch). The
    batch marks the image tokens (the config's ``image_token_id``) for ``positions="image"``.

    >>> import torch, reftgraph as rg
    >>> inputs, batch = from_inputs(rg.models.tiny("llama"), {"input_ids": torch.tensor([[0, 5, 6]]),
    ...                                                      "attention_mask": torch.tensor([[0, 1, 1]])})
    >>> sorted(inputs), batch.start.tolist(), batch.length.tolist(), batch.marks
    (['attention_mask', 'input_ids', 'position_ids'], [1], [2], {})
    """
    ids, mask = given.get("input_ids"), given.get("attention_mask")
    if not (torch.is_tensor(ids) and ids.dim() == 2):
        raise DataError("model inputs need input_ids [batch, tokens] (a tensor, as a processor returns them with "
                        "return_tensors='pt')")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise DataError(f"attention_mask {list(mask.shape)} and input_ids {list(ids.shape)} differ in shape")
    inputs = {**{k: v for k, v in given.items() if k not in ("input_ids", "attention_mask")},
              **model.arch.inputs(ids, mask)}
    config = model.hf.config
    image = next((getattr(config, k) for k in ("image_token_id", "image_token_index")
                  if isinstance(getattr(config, k, None), int)), None)
    marks = {"image": (ids == image) & mask.bool()} if image is not None and bool((ids == image).any()) else {}
    return with_decoder(model, inputs, dataclasses.replace(Batch.from_mask(mask), marks=marks))


def with_decoder(model: Model, inputs: dict, batch: Batch) -> tuple[dict, Batch]:
    """An encoder-decoder's inputs and batch: the decoder's tokens (``decoder_input_ids``
    given, else each row's decoder start token) and their layout, with the encoder's prompts
    as ``batch.stacks["encoder"]``; any other model's unchanged.

    >>> import torch, reftgraph as rg
    >>> lm = rg.models.tiny("t5")
    >>> inputs, batch = with_decoder(lm, {"input_ids": torch.tensor([[5, 6, 7]])}, Batch.full(1, 3))
    >>> inputs["decoder_input_ids"].tolist(), batch.seq_len, batch.of("encoder").seq_len
    ([[0]], 1, 3)
    """
    if not model.arch.stacks:
        return inputs, batch
    given = inputs.get("decoder_input_ids")
    if given is None:
        config, gen = model.hf.config, getattr(model.hf, "generation_config", None)
        start = next((t for t in (getattr(gen, "decoder_start_token_id", None), getattr(
            config, "decoder_start_token_id", None), getattr(gen, "bos_token_id", None)) if isinstance(t, int)), None)
        if start is None:      # (the order transformers' generate takes them in)
            raise DataError(f"{model.name or model.arch.family.name} has no decoder_start_token_id: pass "
                            "decoder_input_ids with the inputs")
        n = inputs["input_ids"].shape[0]
        inputs = {**inputs, "decoder_input_ids": torch.full((n, 1), start, dtype=torch.long)}
        decoder = Batch.full(n, 1)
    else:
        mask = inputs.get("decoder_attention_mask")
        decoder = Batch.from_mask(torch.ones_like(given) if mask is None else mask)
    return inputs, dataclasses.replace(decoder, rows=batch.rows, stacks={"encoder": batch})


def tokenize(model: Model, streams: dict, padding_side: Optional[str] = None):
    """Tokenize ``{stream: prompts}`` into one padded batch; returns (inputs, Batch).

    >>> import reftgraph as rg
    >>> inputs, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "abcd"], "source": ["x"]}, "right")
    >>> inputs["input_ids"].shape, batch.rows["source"], batch.length.tolist()
    (torch.Size([3, 4]), slice(2, 3, None), [2, 4, 1])
    """
    if padding_side not in (None, "left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts, rows = [], {}
    for name, prompts in streams.items():
        rows[name] = slice(len(texts), len(texts) + len(prompts))
        texts += prompts
    tok = model.tokenizer
    side = padding_side or tok.padding_side
    memo = _TOKENIZED.get(tok)
    if memo is None:
        memo = _TOKENIZED[tok] = OrderedDict()
    key = (side, tuple(texts))
    entry = memo.get(key)
    if entry is None or entry[-1] != len(tok):   # new prompts, or tokens were added since: encode
        if entry is not None:
            memo.clear()
        entry = memo[key] = _encode(tok, texts, side)
        if len(memo) > MAX_TOKENIZED:
            memo.popitem(last=False)
    ids, mask, start, length, seq_len, ragged, _ = entry
    limit = model.arch.max_tokens
    if limit is not None and seq_len > limit:
        row = int(length.argmax())
        raise DataError(f"prompt {row} is {int(length[row])} tokens; {model.name or model.arch.family.name} has "
                        f"learned position embeddings for {limit} tokens at most: shorten it")
    side_failed = model.arch.padding.get(side) if ragged else None
    if side_failed:
        raise DataError(f"{model.name or model.arch.family.name} cannot run prompts of different lengths "
                        f"padded on the {side}: {side_failed}; use padding_side="
                        f"{'right' if side == 'left' else 'left'!r} or prompts of one length")
    # copies: a caller editing a result in place never changes what later runs get
    inputs = model.arch.inputs(ids.clone(), mask.clone())
    return with_decoder(model, inputs, Batch(rows, start.clone(), length.clone(), seq_len))


def _encode(tok, texts: list, side: str):
    # padded here, not by the tokenizer: setting its padding_side would race with other threads
    rows = tok(texts, padding=False)["input_ids"]
    length = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if bool((length == 0).any()):
        raise DataError("an empty prompt tokenizes to no tokens; every prompt needs at least one")
    width = int(length.max())
    ids = torch.full((len(rows), width), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        mask[i, at] = 1
    # the tokenizer's size comes last: tokens added later make the entry stale
    return ids, mask, mask.argmax(1), length, width, bool((length != width).any()), len(tok)


def last_token(values: torch.Tensor, batch: Batch, stream: str = "base") -> torch.Tensor:
    """``values[N, S, ...]`` at the last prompt token of each row of ``stream``: ``[rows, ...]``.

    >>> import reftgraph as rg
    >>> inputs, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "cde"]}, "right")
    >>> last_token(inputs["input_ids"][..., None], batch)[:, 0].tolist()    # "b" and "e"
    [68, 71]
    """
    rows = batch.rows[stream]
    last = (batch.start + batch.length - 1)[rows]
    return values[rows][torch.arange(len(last)), last.to(values.device)]
