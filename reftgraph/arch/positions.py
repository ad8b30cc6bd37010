"""How a model numbers token positions, proven so that an empty graph runs the model
exactly as the model runs itself, with either padding side.

>>> import reftgraph as rg
>>> rg.models.tiny("gpt2").arch.positions, rg.models.tiny("roberta").arch.positions
('explicit', 'model')

The engine tokenizes a batch with padding and must tell the model where each row's
tokens sit. Most models take ``position_ids`` (each row counts from 0 at its first real
token: ``"explicit"``); the engine passes them, which makes left padding invisible.
Others number positions themselves from the input ids (RoBERTa and its kin start at
``padding_idx + 1`` and skip pad tokens: ``"model"``); passing ``position_ids`` would
shift every position, so the engine passes none. :func:`prove_positions` decides on a
tiny instance of the config: the unpadded forward with the engine's inputs must equal
the model's own forward, and so must each row of a left- and a right-padded batch.
"""

from __future__ import annotations

from typing import Optional

import torch

MODES = ("explicit", "model")


def model_inputs(mode: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The inputs the engine gives the model for ``input_ids`` padded as ``attention_mask``.

    >>> import torch
    >>> mask = torch.tensor([[0, 1, 1]])
    >>> model_inputs("explicit", torch.tensor([[0, 5, 6]]), mask)["position_ids"].tolist()
    [[0, 0, 1]]
    >>> sorted(model_inputs("model", torch.tensor([[0, 5, 6]]), mask))
    ['attention_mask', 'input_ids']
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if mode == "explicit":
        inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return inputs


def _logits(model, inputs: dict) -> Optional[torch.Tensor]:
    """The model's per-token output: its logits, or (an encoder without a token head) its last hidden state."""
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    except Exception:  # noqa: BLE001 - a model that refuses these inputs fails the proof
        return None
    logits = token_output(out)
    return logits.float() if isinstance(logits, torch.Tensor) else None


def token_output(out) -> Optional[torch.Tensor]:
    """A transformers model output's per-token tensor: the logits, or where they are not per
    token (an encoder's sequence classifier, a bare encoder) the last hidden state.

    >>> import torch
    >>> from transformers.modeling_outputs import SequenceClassifierOutput
    >>> token_output(SequenceClassifierOutput(logits=torch.zeros(1, 2), hidden_states=(torch.ones(1, 3, 4),))).shape
    torch.Size([1, 3, 4])
    """
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        return logits
    states = getattr(out, "hidden_states", None)
    return states[-1] if states else getattr(out, "last_hidden_state", None)


def _close(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _padded(ids: torch.Tensor, pad: int, n: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    pads = torch.full((1, n), pad, dtype=ids.dtype)
    ones, zeros = torch.ones_like(ids), torch.zeros_like(pads)
    if side == "left":
        return torch.cat([pads, ids], 1), torch.cat([zeros, ones], 1)
    return torch.cat([ids, pads], 1), torch.cat([ones, zeros], 1)


def prove_positions(model, ids: torch.Tensor) -> tuple[str, dict]:
    """``(mode, {padding side: why it fails})`` for ``model`` (a tiny instance) on ``ids [1, S]``.

    >>> import torch, reftgraph as rg
    >>> prove_positions(rg.models.tiny("roberta").hf, torch.tensor([[5, 6, 7, 8]]))
    ('model', {})

    The mode is the first of :data:`MODES` whose unpadded forward equals the model's own
    (``model(input_ids=ids)``); then each padding side is checked: the real positions of a
    padded row must equal the unpadded forward. A side that fails is returned with the gap.
    """
    own = _logits(model, {"input_ids": ids})
    mode = next((m for m in MODES if _close(_logits(model, model_inputs(m, ids, torch.ones_like(ids))), own)),
                None)
    if mode is None:
        return "explicit", {side: "the model's own forward could not be reproduced with any position numbering"
                            for side in ("left", "right")}
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < model.get_input_embeddings().num_embeddings else 0
    failed = {}
    for side in ("left", "right"):
        padded, mask = _padded(ids, pad, 3, side)
        got = _logits(model, model_inputs(mode, padded, mask))
        real = got[:, mask[0].bool()] if got is not None else None
        if not _close(real, own):
            gap = "an error" if real is None else f"max |diff| {float((real - own).abs().max()):.2g}"
            failed[side] = f"a {side}-padded row differs from the row alone ({gap})"
    return mode, failed


def learned_limit(model, mode: str) -> Optional[int]:
    """How many tokens a model with learned position embeddings can see (GPT-2's
    ``n_positions``), or None when positions are computed (RoPE, ALiBi) and no table ends.

    >>> import reftgraph as rg
    >>> learned_limit(rg.models.tiny("gpt2").hf, "explicit"), learned_limit(rg.models.tiny("llama").hf, "explicit")
    (128, None)

    A table that starts at an offset (OPT's 2, RoBERTa's ``padding_idx + 1``) holds that
    many fewer positions.
    """
    inputs = model.get_input_embeddings()
    limits = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1].lower()
        if not isinstance(module, torch.nn.Embedding) or module is inputs or not ("pos" in last or last == "wpe"):
            continue
        offset = getattr(module, "offset", 0)
        if mode == "model" and module.padding_idx is not None:
            offset = max(offset, module.padding_idx + 1)
        limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None
