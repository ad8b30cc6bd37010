"""Canonical components -> a model's modules, per architecture family.

A family is a small mapping of module paths. Register your own from your code:

>>> import reftgraph as rg
>>> _ = rg.register_family(rg.Family(
...     name="my_llama_like", model_types=("my_model",), layers="model.layers",
...     attn="self_attn", mlp="mlp", attn_proj="self_attn.o_proj",
...     mlp_down="mlp.down_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..core.sites import HEAD_COMPONENTS, STAGES
from ..errors import SiteError

@dataclass(frozen=True)
class Family:
    """Where the canonical components live in one architecture family.

    >>> FAMILIES["gpt2"].layers, FAMILIES["gpt2"].qkv, FAMILIES["gpt2"].qkv_layout
    ('transformer.h', 'attn.c_attn', 'gpt2')

    Paths are attribute paths: ``layers`` from the model root to the block list, the
    others from a block. ``qkv`` is three paths (separate projections) or one fused
    projection with ``qkv_layout`` ``"gpt2"`` (``[q | k | v]``) or ``"neox"`` (per head
    ``[q_h | k_h | v_h]``).
    """

    name: str
    model_types: tuple
    layers: str
    attn: str
    mlp: str
    attn_proj: str
    mlp_down: str
    qkv: Union[tuple, str]
    qkv_layout: str = "separate"


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make a family known; its ``model_types`` are matched against ``config.model_type``.

    >>> from types import SimpleNamespace
    >>> mine = register_family(Family("mine", ("mine",), "model.layers", "self_attn", "mlp",
    ...                               "self_attn.o_proj", "mlp.down_proj", _LLAMA_QKV))
    >>> family_for(SimpleNamespace(model_type="mine")).name
    'mine'
    >>> del FAMILIES["mine"]    # (keep the registry as it was)
    """
    FAMILIES[family.name] = family
    return family


_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
register_family(Family(
    "llama", ("llama", "mistral", "qwen2", "qwen3", "smollm2", "smollm3", "olmo", "olmo2"), "model.layers",
    "self_attn", "mlp", "self_attn.o_proj", "mlp.down_proj", _LLAMA_QKV,
))
register_family(Family("gpt2", ("gpt2",), "transformer.h", "attn", "mlp", "attn.c_proj", "mlp.c_proj", "attn.c_attn", "gpt2"))
register_family(Family(
    "gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "mlp", "attention.dense",
    "mlp.dense_4h_to_h", "attention.query_key_value", "neox",
))


def _unknown_family_message(model_type: str) -> str:
    known = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())
    return (
        f"model type {model_type!r} has no registered family. Supported: {known}.\n"
        "Register yours from your own code, e.g. for a Llama-like model:\n"
        "    import reftgraph as rg\n"
        f"    rg.register_family(rg.Family(name='mine', model_types=({model_type!r},),\n"
        "        layers='model.layers', attn='self_attn', mlp='mlp', attn_proj='self_attn.o_proj',\n"
        "        mlp_down='mlp.down_proj', qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')))"
    )


def family_for(config) -> Family:
    """The registered family of a transformers config (by ``config.model_type``).

    >>> from transformers import MistralConfig
    >>> family_for(MistralConfig()).name
    'llama'

    Later registrations win; an unknown type raises :class:`SiteError` with the supported
    families and how to register one.
    """
    model_type = getattr(config, "model_type", None)
    for family in reversed(list(FAMILIES.values())):  # later registrations win
        if model_type in family.model_types:
            return family
    raise SiteError(_unknown_family_message(model_type))


def _in_features(model, family: Family) -> Optional[int]:
    """The input width of the MLP's down projection, read off the module (Linear or GPT-2's Conv1D)."""
    module = model
    try:
        for part in f"{family.layers}.0.{family.mlp_down}".split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
    except (AttributeError, IndexError, TypeError):
        return None
    if hasattr(module, "in_features"):
        return module.in_features
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.shape[0]  # Conv1D stores [in, out]


def first(raw):
    """The tensor of a hook value: the first item of a tuple, else the value itself.

    >>> first((1, 2)), first(3)
    (1, 3)
    """
    return raw[0] if isinstance(raw, tuple) else raw


def with_first(raw, new):
    """``raw`` with its tensor (see :func:`first`) replaced by ``new``.

    >>> with_first((1, 2), 9), with_first(3, 9)
    ((9, 2), 9)
    """
    return (new,) + tuple(raw[1:]) if isinstance(raw, tuple) else new


@dataclass(frozen=True)
class Hook:
    """One module access in a layer: ``path`` ('' = the block), ``io`` input/output.

    >>> import reftgraph as rg
    >>> rg.models.tiny("gpt2").arch.hook("mlp_act", 1)     # the input of GPT-2's MLP down projection
    Hook(layer=1, stage=6, path='mlp.c_proj', io='input')
    """

    layer: int
    stage: int
    path: str
    io: str


@dataclass
class Arch:
    """A family resolved against one model's config: dims and component accessors.

    >>> import reftgraph as rg
    >>> a = rg.models.tiny("llama").arch
    >>> a.family.name, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.d_mlp
    ('llama', 2, 32, 4, 2, 8, 48)
    """

    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int

    @classmethod
    def of(cls, model) -> "Arch":
        """The architecture of a transformers model (its family, from ``config.model_type``).

        >>> from transformers import GPT2LMHeadModel
        >>> from reftgraph.models import tiny_config
        >>> Arch.of(GPT2LMHeadModel(tiny_config("gpt2"))).d_mlp
        48
        """
        config = model.config
        family = family_for(config)
        d_model = config.hidden_size
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d_model // n_heads
        d_mlp = _in_features(model, family) or getattr(config, "intermediate_size", None) or 4 * d_model
        return cls(family, config.num_hidden_layers, d_model, n_heads,
                   getattr(config, "num_key_value_heads", None) or n_heads, head_dim, d_mlp)

    # -- dims --------------------------------------------------------------
    def heads(self, component: str) -> int:
        """How many heads ``component`` has: key-value heads for ``k`` and ``v``.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch     # grouped-query: 4 query heads, 2 key-value heads
        >>> arch.heads("q"), arch.heads("k"), arch.heads("head_out")
        (4, 2, 4)
        """
        return self.n_kv_heads if component in ("k", "v") else self.n_heads

    def width(self, component: str) -> int:
        """The last-dim width of ``component``: per head for head components.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch
        >>> arch.width("resid_post"), arch.width("mlp_act"), arch.width("head_out")
        (32, 48, 8)
        """
        if component in HEAD_COMPONENTS:
            return self.head_dim
        return self.d_mlp if component == "mlp_act" else self.d_model

    def layer_index(self, layer: int) -> Optional[int]:
        """Non-negative layer index, or None when out of range.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch     # 2 layers
        >>> arch.layer_index(-1), arch.layer_index(2)
        (1, None)
        """
        resolved = layer + self.n_layers if layer < 0 else layer
        return resolved if 0 <= resolved < self.n_layers else None

    # -- modules -----------------------------------------------------------
    def hook(self, component: str, layer: int) -> Hook:
        """Which module, input or output, holds ``component`` at ``layer`` (non-negative).

        >>> import reftgraph as rg
        >>> rg.models.tiny("llama").arch.hook("head_out", 0)
        Hook(layer=0, stage=4, path='self_attn.o_proj', io='input')
        """
        f = self.family
        stage = STAGES[component]
        if component in ("resid_pre", "resid_post"):
            return Hook(layer, stage, "", "input" if component == "resid_pre" else "output")
        if component in ("attn_out", "resid_mid"):
            return Hook(layer, stage, f.attn, "output")
        if component == "mlp_out":
            return Hook(layer, stage, f.mlp, "output")
        if component == "mlp_act":
            return Hook(layer, stage, f.mlp_down, "input")
        if component == "head_out":
            return Hook(layer, stage, f.attn_proj, "input")
        if isinstance(f.qkv, str):
            return Hook(layer, STAGES["q"], f.qkv, "output")
        return Hook(layer, stage, f.qkv["qkv".index(component)], "output")

    def envoy(self, root, hook: Hook):
        """The nnsight envoy (or torch module) of a hook, from the model root.

        >>> import reftgraph as rg
        >>> lm = rg.models.tiny("llama")
        >>> lm.arch.envoy(lm.hf, lm.arch.hook("mlp_out", 1)) is lm.hf.model.layers[1].mlp
        True
        """
        module = root
        path = f"{self.family.layers}.{hook.layer}" + (f".{hook.path}" if hook.path else "")
        for part in path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        return module

    def view(self, component: str) -> tuple[Callable, Callable]:
        """``(get, put)``: ``get(raw, resid_pre)`` -> ``[B, S, width]`` or ``[B, S, H, Dh]``;
        ``put(raw, new, resid_pre)`` -> the raw hook value with the component replaced.

        >>> import torch, reftgraph as rg
        >>> get, put = rg.models.tiny("gpt2").arch.view("k")   # k inside GPT-2's fused [q | k | v]
        >>> raw = torch.randn(1, 3, 96)
        >>> get(raw, None).shape, torch.equal(put(raw, get(raw, None), None), raw)
        (torch.Size([1, 3, 4, 8]), True)
        """
        if component == "resid_mid":
            return (lambda raw, pre: pre + first(raw),
                    lambda raw, new, pre: with_first(raw, new - pre))
        if component not in HEAD_COMPONENTS:
            return (lambda raw, pre: first(raw), lambda raw, new, pre: with_first(raw, new))
        heads, dh = self.heads(component), self.head_dim
        layout = "separate" if component == "head_out" else self.family.qkv_layout
        if layout == "separate":
            return (lambda raw, pre: raw.unflatten(-1, (heads, dh)),
                    lambda raw, new, pre: new.flatten(-2))
        i = "qkv".index(component)
        if layout == "gpt2":
            d = heads * dh

            def get(raw, pre):
                return raw[..., i * d:(i + 1) * d].unflatten(-1, (heads, dh))

            def put(raw, new, pre):
                parts = list(raw.split(d, -1))
                parts[i] = new.flatten(-2)
                return torch.cat(parts, -1)

            return get, put
        if layout == "neox":
            def get(raw, pre):
                return raw.unflatten(-1, (heads, 3 * dh))[..., i * dh:(i + 1) * dh]

            def put(raw, new, pre):
                parts = list(raw.unflatten(-1, (heads, 3 * dh)).split(dh, -1))
                parts[i] = new
                return torch.cat(parts, -1).flatten(-2)

            return get, put
        raise SiteError(f"family {self.family.name!r}: unknown qkv_layout {layout!r}")
