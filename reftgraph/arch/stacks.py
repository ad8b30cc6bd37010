"""Encoder-decoders: two stacks of blocks in one model, and how the proofs run either.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("t5")
>>> sorted(lm.arch.stacks), lm.arch.stack, lm.arch.stacks["encoder"].family.layers
(['decoder', 'encoder'], 'decoder', 'encoder.block')

A site names its stack (``rg.Site("resid_post", layer=1, stack="encoder")``); without one it
is in the decoder, whose output is the logits. The proofs of either stack run the whole
model with the same tokens given to both (:func:`feeding_decoder`).
"""

from __future__ import annotations

import contextlib

from ..core.sites import STACKS

__all__ = ["STACKS", "feeding_decoder", "is_seq2seq"]


def is_seq2seq(model) -> bool:
    """Whether a transformers model is an encoder-decoder (two stacks; the decoder reads the encoder).

    >>> import reftgraph as rg
    >>> is_seq2seq(rg.models.tiny("t5").hf), is_seq2seq(rg.models.tiny("llama").hf)
    (True, False)
    """
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and callable(getattr(model, "get_encoder", None)) \
        and callable(getattr(model, "get_decoder", None)) and model.get_encoder() is not model.get_decoder()


@contextlib.contextmanager
def feeding_decoder(model):
    """While inside, calling an encoder-decoder with ``input_ids`` alone gives its decoder the
    same tokens (and mask): the proofs call every model that way.

    >>> import torch, reftgraph as rg
    >>> hf = rg.models.tiny("t5").hf
    >>> with feeding_decoder(hf):
    ...     hf(input_ids=torch.tensor([[4, 5, 6]])).logits.shape
    torch.Size([1, 3, 259])
    """
    if not is_seq2seq(model):
        yield
        return

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = ids
            if kwargs.get("attention_mask") is not None and kwargs.get("decoder_attention_mask") is None:
                kwargs["decoder_attention_mask"] = kwargs["attention_mask"]
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
