"""Read a transformers model's module tree: the block list and, in each block, the
attention, its projections, the MLP and its down projection, found by names and shapes.

>>> import reftgraph as rg
>>> hf = rg.models.tiny("gpt2").hf
>>> layers, blocks = read_tree(hf, 32)
>>> layers, blocks[0].attn, blocks[0].attn_proj, blocks[0].qkv, blocks[0].mlp_down
('transformer.h', 'attn', 'attn.c_proj', 'attn.c_attn', 'mlp.c_proj')

What is found here is only a candidate: :mod:`reftgraph.arch.proofs` checks what each
module does on a tiny instance before any component is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from ..errors import SiteError

__all__ = ["BlockPaths", "child_attn", "is_norm", "linear_shape", "read_tree", "read_block", "find_blocks", "blocks_of", "n_layers_of",
           "kind_of"]

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "attn_layer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "ff", "feedforward", "mlp_block")
_FUSED = re.compile(r"(qkv|query_key_value|c_attn|w_pack|in_proj)", re.I)
_SEPARATE = {
    "q": re.compile(r"^(q|query|wq|q_proj|q_lin|query_proj|q_attn)$", re.I),
    "k": re.compile(r"^(k|key|wk|k_proj|k_lin|key_proj)$", re.I),
    "v": re.compile(r"^(v|value|wv|v_proj|v_lin|value_proj)$", re.I),
}
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "proj")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2", "w2", "wo", "out_proj", "proj_out")


@dataclass(frozen=True)
class BlockPaths:
    """Candidate module paths inside one block ('' or None where nothing was found).

    >>> BlockPaths(attn="self_attn").mlp is None
    True

    ``qkv`` is three paths (separate projections) or one path (fused); ``mlp_out`` and
    ``attn_out`` are filled in by the proofs (the module whose output the block adds).
    """

    attn: Optional[str] = None
    attn_proj: Optional[str] = None
    qkv: Union[tuple, str, None] = None
    mlp: Optional[str] = None
    mlp_down: Optional[str] = None
    mlp_in: Optional[str] = None
    cross: Optional[str] = None      # an encoder-decoder's cross-attention (decoder blocks)
    cross_proj: Optional[str] = None
    children: tuple = ()
    note: str = ""


def linear_shape(module) -> Optional[tuple]:
    """``(in, out)`` of a linear map (``nn.Linear`` or GPT-2's ``Conv1D``), else None.

    >>> import torch
    >>> linear_shape(torch.nn.Linear(3, 5)), linear_shape(torch.nn.ReLU())
    ((3, 5), None)
    """
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return tuple(weight.shape)   # Conv1D stores [in, out]
    return None


def n_layers_of(config) -> Optional[int]:
    """The number of blocks a config declares.

    >>> from transformers import GPT2Config
    >>> n_layers_of(GPT2Config(n_layer=3))
    3
    """
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model, stack: Optional[str] = None) -> tuple[str, torch.nn.ModuleList]:
    """The path and module list of the model's blocks: the shallowest list of ``n_layers``
    blocks, in the language model (``get_decoder()``) when the model has other towers, or in
    ``stack`` (``"encoder"`` or ``"decoder"``) of an encoder-decoder.

    >>> import reftgraph as rg
    >>> find_blocks(rg.models.tiny("llama").hf)[0]
    'model.layers'

    When no list has the declared count, the shallowest list of alike blocks (one class,
    each with linear maps) is taken, the largest first.
    """
    config = model.config
    n = n_layers_of(config)
    if stack == "encoder":
        n = getattr(config, "encoder_layers", None) or n
    elif stack == "decoder":
        n = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or n
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    get = getattr(model, f"get_{stack or 'decoder'}", None)
    tower = get() if callable(get) else None
    prefix = next((name for name, m in model.named_modules() if m is tower and name), None)
    if prefix:
        inside = [(name, m) for name, m in lists if name.startswith(prefix + ".")]
        lists = inside or lists
    exact = [(name, m) for name, m in lists if n is None or len(m) == n]
    alike = [(name, m) for name, m in lists if len({type(b) for b in m}) == 1
             and any(linear_shape(x) for x in m[0].modules())]
    chosen = exact or sorted(alike, key=lambda item: (item[0].count("."), -len(item[1])))
    if not chosen:
        found = [f"{name} ({len(m)})" for name, m in lists]
        raise SiteError(f"{type(model).__name__}: no list of {n} blocks in the module tree (module lists found: "
                        f"{', '.join(found) or 'none'}); register where they are: {_OVERRIDE_HINT}")
    name, blocks = min(chosen, key=lambda item: item[0].count(".")) if exact else chosen[0]
    return name, blocks


def is_norm(module) -> bool:
    """A normalisation layer: 'norm' in its class name and no linear map inside.

    >>> import torch
    >>> is_norm(torch.nn.LayerNorm(4)), is_norm(torch.nn.Linear(4, 4))
    (True, False)
    """
    return "norm" in type(module).__name__.lower() and not any(linear_shape(m) for m in module.modules())


def _pick(names, candidates):
    for want in candidates:
        if want in names:
            return want
    return None


def _children(block) -> dict:
    """name -> module of a block's sub-layers: its children, with a list of sub-layers (T5's
    ``layer``) read as its items (``layer.0``, ``layer.1``, ...)."""
    out = {}
    for name, m in block.named_children():
        if isinstance(m, torch.nn.ModuleList):
            out.update({f"{name}.{i}": item for i, item in enumerate(m)})
        else:
            out[name] = m
    return out


def _attention_like(name: str, module) -> bool:
    """A sub-layer named as attention, or holding a child named so (T5's ``layer.0.SelfAttention``)."""
    names = [name] + ([n for n, _ in module.named_children()] if "." in name else [])
    return any("attn" in n.lower() or "attention" in n.lower() for n in names)


_CROSS = re.compile(r"(cross|encoder_attn|encdec|enc_dec)", re.I)


def child_attn(block) -> tuple:
    """(self-attention, cross-attention) sub-layer paths of a block (None where absent).

    >>> import reftgraph as rg
    >>> child_attn(rg.models.tiny("llama").hf.model.layers[0])
    ('self_attn', None)
    """
    children = {name: m for name, m in _children(block).items() if not is_norm(m)}
    linear = {n for n, m in children.items() if any(linear_shape(x) for x in m.modules())}
    like = [n for n in children if n in linear and _attention_like(n, children[n])]
    cross = next((n for n in like if _CROSS.search(n) or any(_CROSS.search(c) for c, _ in children[n].named_children())),
                 None)
    rest = [n for n in like if n != cross]
    choice = _pick([n for n in rest if "." not in n], _ATTN_NAMES) or next(iter(rest), None)
    if choice and "." not in choice:
        choice = _inside_norms(choice, children[choice])
    return (choice, cross) if choice else (cross, None)   # (a lone cross-attention, Mllama's: the block's attention)


def _inside_norms(name: str, module) -> str:
    """The attention inside a sub-layer that wraps it with its norms (DBRX's ``norm_attn_norm``:
    norm, attention, norm): the one child with a matrix, named as attention, beside norms."""
    kids = dict(module.named_children())
    norms = [n for n, m in kids.items() if is_norm(m)]
    held = [n for n, m in kids.items() if any(linear_shape(x) for x in m.modules())]
    if norms and len(held) == 1 and _attention_like(held[0], kids[held[0]]):
        return f"{name}.{held[0]}"
    return name


def _attention_parts(attn_path: str, attn, d_model: int):
    """(output projection, q/k/v) inside an attention module: the innermost module that has a
    linear map to the model width, and beside it the maps from the model width."""
    for prefix, parent in sorted(attn.named_modules(), key=lambda item: item[0].count(".") + bool(item[0])):
        linears = {n: linear_shape(m) for n, m in parent.named_children() if linear_shape(m)}
        outs = [n for n, (i, o) in linears.items()
                if o == d_model and not any(rx.match(n) for rx in _SEPARATE.values()) and not _FUSED.search(n)]
        if not outs:
            continue
        out = _pick(outs, _OUT_NAMES) or outs[-1]
        base = f"{attn_path}.{prefix}." if prefix else f"{attn_path}."
        fused = [n for n in linears if n != out and _FUSED.search(n) and linears[n][0] == d_model]
        qkv: Union[tuple, str, None] = None
        if fused:
            qkv = base + fused[0]
        else:
            found = {c: next((n for n in linears if n != out and rx.match(n)), None) for c, rx in _SEPARATE.items()}
            found = {c: base + n if n else None for c, n in found.items()}
            if not found["q"]:     # projections beside the output's parent (BERT: attention.self.query)
                found = _separate_anywhere(attn_path, attn, base + out)
            if all(found.values()):
                qkv = tuple(found[c] for c in "qkv")
            elif found["q"]:
                qkv = (found["q"], None, None)
        return base + out, qkv
    return None, None


def _separate_anywhere(attn_path: str, attn, out: str) -> dict:
    """component -> path of the first q/k/v projection anywhere in the attention module (None when absent)."""
    found = dict.fromkeys("qkv")
    for name, module in attn.named_modules():
        leaf, path = name.rsplit(".", 1)[-1], f"{attn_path}.{name}"
        for c, rx in _SEPARATE.items():
            if found[c] is None and path != out and linear_shape(module) and rx.match(leaf):
                found[c] = path
    return found


def _child_mlp(block, attn: Optional[str], d_model: int, cross: Optional[str] = None) -> tuple:
    """(mlp, down projection, the module that reads the MLP's input)."""
    children = {n: m for n, m in _children(block).items() if n != cross}
    name = _pick(children, _MLP_NAMES)
    if name is None:
        name = next((n for n, m in children.items() if n != attn and not is_norm(m)
                     and ("mlp" in n.lower() or "moe" in n.lower() or "ff" in n.lower())), None)
    if name is None:   # a sub-layer holding the MLP (T5's layer.1.DenseReluDense)
        name = next((n for n, m in children.items() if n != attn and "." in n and any(
            _pick([c], _MLP_NAMES) or "dense" in c.lower() for c, _ in m.named_children())), None)
    if name is None:  # no MLP module (OPT, XGLM ...): the last linear map back to the width
        outs = [n for n, m in children.items() if n != attn and (linear_shape(m) or (0, 0))[1] == d_model]
        ins = [n for n, m in children.items() if n != attn and (linear_shape(m) or (0, 0))[0] == d_model]
        return (outs[-1], outs[-1], ins[0] if ins else outs[-1]) if outs else _split_mlp(children, attn, d_model)
    mlp = children[name]
    if linear_shape(mlp):
        return name, name, name
    downs = [n for n, m in mlp.named_children() if (linear_shape(m) or (0, 0))[1] == d_model]
    if not downs and "." in name:   # a sub-layer holding the MLP: the maps one level down (T5's DenseReluDense.wo)
        downs = [n for n, m in mlp.named_modules() if n.count(".") == 1 and (linear_shape(m) or (0, 0))[1] == d_model]
    down = _pick(downs, _DOWN_NAMES) or _pick([n.rsplit(".", 1)[-1] for n in downs], _DOWN_NAMES) or (
        downs[-1] if len(downs) == 1 else None)
    down = next((n for n in downs if n == down or n.endswith("." + str(down))), None)
    return name, (f"{name}.{down}" if down else None), name


def _split_mlp(children: dict, attn: Optional[str], d_model: int) -> tuple:
    """(up module, down projection, up module) for an MLP split over two children (BERT's
    ``intermediate`` and ``output``: one holds the maps from the width, the next a map back)."""
    def maps(m):
        return [(n, linear_shape(x)) for n, x in m.named_modules() if linear_shape(x)]

    names = [n for n, m in children.items() if n != attn and not is_norm(m) and maps(m)]
    for up, down in zip(names, names[1:]):
        ups, downs = maps(children[up]), maps(children[down])
        if all(s[0] == d_model and s[1] != d_model for _, s in ups) and len(downs) == 1 and \
                downs[0][1][1] == d_model and downs[0][1][0] == ups[-1][1][1]:
            return up, f"{down}.{downs[0][0]}", up
    return None, None, None


def read_block(block, d_model: int) -> BlockPaths:
    """Candidate paths inside one block.

    >>> import reftgraph as rg
    >>> p = read_block(rg.models.tiny("llama").hf.model.layers[0], 32)
    >>> p.qkv, p.mlp_down
    (('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), 'mlp.down_proj')
    """
    attn, cross = child_attn(block)
    subs = _children(block)
    attn_proj, qkv = _attention_parts(attn, block.get_submodule(attn), d_model) if attn else (None, None)
    cross_proj = _attention_parts(cross, subs[cross], d_model)[0] if cross else None
    mlp, down, mlp_in = _child_mlp(block, attn, d_model, cross)
    children = tuple(name for name, _ in block.named_children())
    return BlockPaths(attn=attn, attn_proj=attn_proj, qkv=qkv, mlp=mlp, mlp_down=down, mlp_in=mlp_in, cross=cross,
                      cross_proj=cross_proj, children=children)


def with_override(paths: BlockPaths, family) -> BlockPaths:
    """``paths`` with a user's :class:`~reftgraph.arch.structure.Family` fields put over them.

    >>> from reftgraph.arch.structure import Family
    >>> with_override(BlockPaths(attn="a"), Family("f", ("x",), attn="b")).attn
    'b'
    """
    fields = {k: getattr(family, k) for k in ("attn", "attn_proj", "qkv", "mlp", "mlp_down") if getattr(family, k)}
    if family.mlp:
        fields["mlp_in"] = family.mlp
    return replace(paths, **fields)


def kind_of(block) -> tuple:
    """A block's kind: its class and its children's names and classes (hybrid models mix kinds).

    >>> import reftgraph as rg
    >>> kind_of(rg.models.tiny("llama").hf.model.layers[0])[0]
    'LlamaDecoderLayer'
    """
    return (type(block).__name__,) + tuple((n, type(m).__name__) for n, m in block.named_children())


def blocks_of(model, family=None) -> tuple[str, torch.nn.Module]:
    """``(path, module list)`` of the blocks: a user family's ``layers`` path, else :func:`find_blocks`.

    >>> import reftgraph as rg
    >>> blocks_of(rg.models.tiny("gpt2").hf)[0]
    'transformer.h'
    """
    if family is None or not family.layers:
        return find_blocks(model)
    blocks = model
    for part in family.layers.split("."):
        blocks = getattr(blocks, part)
    return family.layers, blocks


def read_tree(model, d_model: int, family=None) -> tuple[str, list[BlockPaths]]:
    """``(path of the block list, candidate paths per block)``; a user family's fields win.

    >>> import reftgraph as rg
    >>> read_tree(rg.models.tiny("gpt_neox").hf, 32)[1][1].qkv
    'attention.query_key_value'
    """
    layers, blocks = blocks_of(model, family)
    paths = [read_block(b, d_model) for b in blocks]
    if family is not None:
        paths = [with_override(p, family) for p in paths]
    return layers, paths


_OVERRIDE_HINT = (
    "\n    import reftgraph as rg\n"
    "    rg.register_family(rg.Family(name='mine', model_types=('<config.model_type>',),\n"
    "        layers='model.layers', attn='self_attn', mlp='mlp', attn_proj='self_attn.o_proj',\n"
    "        mlp_down='mlp.down_proj', qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')))"
)
