"""Prove what each component means on one architecture, numerically, before anyone uses it.

>>> import reftgraph as rg
>>> block = rg.models.tiny("gpt_neox").arch.blocks[0]
>>> block.style, block.qkv_layout, sorted(block.refused)
('parallel', 'per_head', ['cross_attn_out', 'logits', 'logits_in', 'mixer_out', 'resid_mid'])
>>> print(block.refused["resid_mid"])
parallel block: attention and MLP both read resid_pre, so no stream lies between them (use resid_pre or resid_post)

On a tiny random instance of the model's config (built in memory, once per config) one
forward is recorded with plain PyTorch hooks, then:

- ``resid_post[L] == resid_pre[L+1]``;
- a block style (:mod:`reftgraph.arch.styles`) whose identities hold:
  ``resid_pre + attn_out == resid_mid`` and ``resid_mid + mlp_out == resid_post``, or the
  parallel sum; an edit of ``attn_out`` / ``mlp_out`` then moves that stream by exactly
  the edit;
- the output projection's output equals the attention output (``head_out`` is its input,
  one slice per head) and the down projection's output equals the MLP output (``mlp_act``);
- locality, which proves the head and q/k/v layouts: adding to ``q`` of head h at position
  p moves ``head_out`` of head h at p alone; adding to ``k``/``v`` of key-value head g moves
  ``head_out`` of g's query heads alone, at p and later; ``v`` acts linearly.

A component that fails is refused on that architecture, with the check that failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..core.sites import COMPONENTS, END_COMPONENTS, STAGES
from .components import COMPONENT_TYPES, Context, component
from .components.base import MLP_READS, no_module
from .components.ends import prove_ends
from .positions import prove_positions
from .recording import record
from .stacks import feeding_decoder
from .streams import Stream, find_stream, layout_reason
from .styles import STYLES, Record
from .styles.weighted import value
from .tree import BlockPaths, blocks_of, kind_of, linear_shape, read_tree

__all__ = ["Block", "prove", "dims_of", "forget", "randomise_zero_maps", "text_config"]

SEQ = 6          # tokens in the proof forward


@dataclass(frozen=True)
class Block:
    """One block's components, proven: module paths, style, heads, widths and refusals.

    >>> import reftgraph as rg
    >>> b = rg.models.tiny("llama").arch.blocks[0]
    >>> b.style, b.attn_out, b.heads, b.widths["head_out"], sorted(b.refused)   # the stream's ends: last block
    ('sequential', 'self_attn', (4, 2), 8, ['cross_attn_out', 'logits', 'logits_in', 'mixer_out'])

    ``refused`` maps a component to the reason it cannot be used on this block; ``stages``
    orders the hook points as the block runs them; ``flat`` names components whose module
    sees tokens flattened to ``[batch * tokens, width]`` (they are viewed back per token).
    """

    paths: BlockPaths
    style: Optional[str] = None
    attn_out: Optional[str] = None
    mlp_out: Optional[str] = None
    qkv_layout: Optional[str] = None
    heads: tuple = (0, 0)
    widths: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    flat: frozenset = frozenset()
    inner: dict = field(default_factory=dict)   # component -> operations inside a module (attn_pattern; and
    #                                             "attn_pattern_module": the module they run in, when not the attention)
    ends: dict = field(default_factory=dict)    # embed / logits_in / logits -> (Address, scale or vocab) here
    reads: dict = field(default_factory=dict)   # receiver input -> the norm its reader applies ('' none)
    mixer: Optional[str] = None                 # the module mixer_out reads (a block without attention or MLP)
    norms: dict = field(default_factory=dict)   # Post-LN: attn_out / mlp_out -> the norm after its addition
    scales: dict = field(default_factory=dict)  # scaled: attn_out / mlp_out -> (block attribute, its value here)
    cross: Optional[str] = None                 # the module whose output cross_attn_out is (encoder-decoders)
    stream: Optional[Stream] = None             # a stream not laid out as [batch, tokens, width] (streams.py)


# -- dims ------------------------------------------------------------------

def text_config(config):
    """The config of the text tower (a vision-language model's ``text_config``), else ``config``.

    >>> from transformers import LlamaConfig
    >>> text_config(LlamaConfig()).model_type
    'llama'
    """
    get = getattr(config, "get_text_config", None)
    return (get() if callable(get) else None) or config


def _n_heads(config) -> Optional[int]:
    config = text_config(config)
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _n_kv_config(config) -> Optional[int]:
    config = text_config(config)
    for key in ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 if getattr(config, "multi_query", False) is True else None


def _width(model) -> int:
    return getattr(text_config(model.config), "hidden_size", None) or model.get_input_embeddings().embedding_dim


def _module(root, path: Optional[str]):
    if not path:
        return root if path == "" else None
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part, None)
        if root is None:
            return None
    return root


def dims_of(config, block, paths: BlockPaths) -> tuple[tuple, dict]:
    """``((query heads, key-value heads), widths)`` of one block, from its config and shapes.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("gpt2")
    >>> dims_of(lm.hf.config, lm.hf.transformer.h[0], lm.arch.blocks[0].paths)
    ((4, 4), {'head_out': 8, 'mlp_act': 48, 'q': 8, 'k': 8, 'v': 8})
    """
    nq = _n_heads(config) or 0
    widths = {}
    o = linear_shape(_module(block, paths.attn_proj)) if paths.attn_proj else None
    if o and nq and o[0] % nq == 0:
        widths["head_out"] = o[0] // nq
    down = linear_shape(_module(block, paths.mlp_down)) if paths.mlp_down else None
    if down:
        widths["mlp_act"] = down[0]
    nkv = _n_kv_config(config)
    if isinstance(paths.qkv, tuple):
        shapes = [linear_shape(_module(block, p)) if p else None for p in paths.qkv]
        if shapes[0] and nq and shapes[0][1] % nq == 0:
            widths["q"] = shapes[0][1] // nq
        if shapes[1] and shapes[2] and "q" in widths:
            nkv = nkv if nkv and shapes[1][1] % nkv == 0 else shapes[1][1] // widths["q"]
            if nkv and shapes[1][1] % nkv == 0 and shapes[1][1] == shapes[2][1]:
                widths["k"] = widths["v"] = shapes[1][1] // nkv
    elif isinstance(paths.qkv, str) and "head_out" in widths:
        total = (linear_shape(_module(block, paths.qkv)) or (0, 0))[1]
        dh = widths["head_out"]
        rest = total - nq * dh
        if rest > 0 and rest % (2 * dh) == 0:
            nkv = rest // (2 * dh)
            widths["q"] = widths["k"] = widths["v"] = dh
    return (nq, nkv or nq), widths


# -- the checks --------------------------------------------------------------

def _style(model, blocks, layer, ids, rec, paths):
    """``(style, attn_out, mlp_out, norms, scales, cross, beside)`` or ``(None, reasons)``; the edit checks
    included (``cross``: the module whose output is an encoder-decoder's cross-attention addition, else None;
    ``beside``: component -> a module whose output the block adds with the sub-layer's)."""
    reasons = []
    for style in STYLES:
        found = style.find(rec, paths)
        if isinstance(found, str):
            reasons.append(f"{style.name}: {found}")
            continue
        attn_out, mlp_out, extras = (found + ({},))[:3]
        norms, scales = extras.get("norms", {}), {c: (a, rec.scales[a]) for c, a in extras.get("scales", {}).items()}
        scales.update(extras.get("weights", {}))     # weighted: component -> (Weighing, beta per dimension)
        cross = extras.get("cross")
        bad = _edit_moves(model, blocks, layer, ids, rec, paths, style, (attn_out, cross, mlp_out), norms, scales)
        if bad:
            reasons.append(f"{style.name}: {bad}")
            continue
        return style, attn_out, mlp_out, norms, scales, cross, extras.get("beside", {})
    return None, "; ".join(reasons)


def _edit_moves(model, blocks, layer, ids, rec, paths, style, outputs, norms, scales) -> str:
    """Why adding to attn_out / mlp_out does not move the stream by exactly the addition (or,
    through the norm after it, to that norm of the moved sum) ('' when it does). A scaled
    addition is edited in the module's output divided by the scale."""
    moves_of = (style.attn_moves, "mid", "post")
    for component, path, moves in zip(("attn_out", "cross_attn_out", "mlp_out"), outputs, moves_of):
        if not path:
            continue
        if rec.calls.get(path, 0) != 1:
            return f"{component} module {path!r} runs {rec.calls.get(path, 0)} times per block"
        if moves == "mid" and not paths.mlp:
            moves = "post"
        delta = torch.randn(rec.out(path).shape[-1], generator=torch.Generator().manual_seed(1))
        c = scales.get(component, (None, 1.0))[1]
        new, _, _ = record(model, blocks, layer, ids, edit=(path, lambda t: t + delta / c))
        norm = norms.get(component)
        if norm:      # Post-LN: the norm of the moved sum
            with torch.no_grad():
                after, want = new.out(norm), _module(blocks[layer], norm)(rec.inp(norm) + delta)
            how = f"to {norm}(the sum + the addition)"
        else:
            reads = paths.cross if component == "attn_out" and outputs[1] else paths.mlp_in   # (cross: what it reads)
            before, after = (rec.mid(reads), new.mid(reads)) if moves == "mid" else (rec.post, new.post)
            weighing = scales.get(component, (None,))[0]
            if weighing is not None and not isinstance(weighing, str):    # weighted: the sum, wherever the block reads it
                before, after = value(rec, weighing.total), value(new, weighing.total)
            want, how = None if before is None else before + delta, "by the same amount"
        if not Record.close(after, want):
            return f"adding to {component} ({path}) does not move resid_{moves} {how} ({Record.gap(after, want)})"
    return ""


def _prove_kind(model, blocks, layer, ids, paths: BlockPaths) -> Block:
    try:
        return _prove_block(model, blocks, layer, ids, paths)
    except Exception as err:  # noqa: BLE001 - a block the checks cannot run on is refused, not trusted
        why = f"the proofs could not run on this block ({type(err).__name__}: {err})"
        return Block(paths, refused={c: why for c in COMPONENTS if c not in ("resid_pre", "resid_post")})


def _prove_block(model, blocks, layer, ids, paths: BlockPaths) -> Block:
    config = model.config
    heads, widths = dims_of(config, blocks[layer], paths)
    rec, nxt, order = record(model, blocks, layer, ids)
    if paths.cross and not rec.calls.get(paths.cross):   # a decoder run alone (BartForCausalLM): no cross-attention
        paths = replace(paths, cross=None, cross_proj=None)
    if rec.calls.get("", 0) != 1:
        why = f"the block runs {rec.calls.get('', 0)} times per forward; an edit would reach its first run only"
        return Block(paths, refused={c: why for c in COMPONENTS})
    want = (ids.shape[0], ids.shape[1], _width(model))
    for component_name, value in (("resid_pre", rec.pre), ("resid_post", rec.post)):
        if isinstance(value, str):
            why = f"the block returns a {value} (a named tuple), which an edit of its output cannot rebuild"
            return Block(paths, refused={c: why for c in COMPONENTS})
        if (isinstance(value, torch.Tensor) and isinstance(rec.post, torch.Tensor) and tuple(value.shape) != want
                and rec.post.shape == rec.pre.shape):
            stream = find_stream(value.shape, *want, model.config)
            if isinstance(stream, Stream):
                return _streams_only(paths, rec, nxt, order, stream)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            why = (f"the block's {'input' if component_name == 'resid_pre' else 'output'} is {got}, not [batch, "
                   f"tokens, width] = {list(want)} (the blocks do not see one vector per input token)")
            return Block(paths, refused={c: why for c in COMPONENTS})
    ctx = Context(model, blocks, layer, ids, paths, rec, heads, widths, next_input=nxt)
    if not paths.attn and not paths.mlp:
        ctx.style_problem = no_module("attention or MLP", paths)
    else:
        found = _style(model, blocks, layer, ids, rec, paths)
        if found[0] is None:
            ctx.style_problem = f"no block style's identities hold ({found[1]})"
        else:
            ctx.style, ctx.attn_out, ctx.mlp_out, ctx.norms, ctx.scales, ctx.cross, ctx.beside = found
    for family in COMPONENT_TYPES:
        family.prove(ctx)
    refused = ctx.refused
    flat = set()
    for c in ("attn_out", "mlp_out", "mlp_act", "head_out", "mlp_in"):
        if c in refused:
            continue
        where = component(c).address(c, ctx)
        value = rec.out(where.path) if where.io == "output" else rec.inp(where.path)
        if value is None or value.dim() == rec.pre.dim():
            continue
        if c in ("mlp_out", "mlp_act", "mlp_in") and value.dim() == 2 and value.shape[0] == rec.pre.shape[0] * rec.pre.shape[1]:
            flat.add(c)   # the block flattens tokens around its MLP (OPT, Llama 4): viewed back per token
        else:
            refused[c] = (f"the block reshapes tokens before {where.path!r} (it sees {list(value.shape)}, not "
                          "[batch, tokens, width])")
    stages = {(p, io): i for i, (p, io) in enumerate(order)}
    component_stages = {c: component(c).stage(c, ctx, stages) for c in COMPONENTS}
    mlp_input = rec.inputs.get(paths.mlp) if paths.mlp else None
    if "mlp_out" not in refused and isinstance(mlp_input, torch.Tensor) and mlp_input.dim() == rec.pre.dim() and (
            paths.mlp, "input") in stages:
        component_stages[MLP_READS] = stages[(paths.mlp, "input")]   # the MLP's own input: where transcoders read
    return Block(paths, ctx.style.name if ctx.style else None, ctx.attn_out, ctx.mlp_out, ctx.layout, heads, widths,
                 refused, {c: v for c, v in component_stages.items() if v is not None}, frozenset(flat), inner=ctx.inner,
                 reads=ctx.reads, mixer=ctx.mixer, norms=ctx.norms, scales=ctx.scales, cross=ctx.cross)


def _streams_only(paths: BlockPaths, rec, nxt, order: list, stream: Stream) -> Block:
    """A block whose stream is laid out otherwise (:mod:`reftgraph.arch.streams`): ``resid_pre``
    and ``resid_post`` through the layout, every other component refused with it as the reason."""
    why = layout_reason(tuple(rec.pre.shape), stream)
    refused = {c: why for c in COMPONENTS if c not in ("resid_pre", "resid_post")}
    if nxt is not None and not Record.close(rec.post, nxt):
        refused["resid_post"] = f"check resid_post == the next block's input failed ({Record.gap(rec.post, nxt)})"
    stages = {(p, io): i for i, (p, io) in enumerate(order)}
    return Block(paths, refused=refused, stream=stream,
                 stages={c: stages[("", io)] for c, io in (("resid_pre", "input"), ("resid_post", "output"))})


# -- driving it: tiny instance, cache -----------------------------------------

_CACHE: dict = {}


def forget() -> None:
    """Drop every cached proof (the next wrap proves again).

    >>> forget()
    """
    _CACHE.clear()


def _key(model, family) -> str:
    config = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        config.pop(k, None)
    return json.dumps([type(model).__name__, repr(family), config], sort_keys=True, default=str)


def _tiny_instance(model, family):
    from transformers import AutoModelForCausalLM

    from .shrink import shrink

    blocks = blocks_of(model, family)[1]
    kinds = {kind_of(b) for b in blocks}
    causal = type(model).__name__.endswith("ForCausalLM") or not hasattr(type(model), "_from_config")
    for layers in (None, len(blocks)):   # more layers when the shrunk pattern lost a kind of block
        torch.manual_seed(0)
        config = shrink(model.config, n_layers=layers)
        tiny = (AutoModelForCausalLM.from_config(config, dtype=torch.float32) if causal     # (an encoder: its own class)
                else type(model)._from_config(config, dtype=torch.float32)).eval()
        if kinds <= {kind_of(b) for b in blocks_of(tiny, family)[1]}:
            break
    _distinct_norms(tiny)
    randomise_zero_maps(tiny)
    return tiny


def randomise_zero_maps(model) -> None:
    """Give a random weight to every matrix initialised to zeros (NeoMME zeroes its output and
    down projections): an edit through a zero map moves nothing, and a proof that nothing else
    moved would then hold without meaning anything.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2); _ = torch.nn.init.zeros_(m.weight)
    >>> randomise_zero_maps(m); bool(m.weight.any())
    True
    """
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.is_floating_point() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _distinct_norms(model) -> None:
    """Give every norm its own weights: freshly built norms are all alike (ones, zeros), and a
    proof that tells two norms apart by their outputs needs them to differ."""
    from .tree import is_norm

    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if is_norm(module):
                for p in module.parameters(recurse=False):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))


def prove(model, d_model: int, family=None) -> tuple[str, list[Block], tuple]:
    """``(path of the block list, a proven Block per layer, (position mode, padding
    failures))`` for a transformers model (positions: :mod:`reftgraph.arch.positions`).

    >>> import reftgraph as rg
    >>> layers, blocks, positions = prove(rg.models.tiny("gpt2").hf, 32)
    >>> layers, blocks[1].style, blocks[1].qkv_layout, positions
    ('transformer.h', 'sequential', 'concat', ('explicit', {}))

    Proofs run on a tiny instance of the config (or, when none can be built, on the
    model itself) and are cached per config.
    """
    layers, paths = read_tree(model, d_model, family)
    real = blocks_of(model, family)[1]
    key = _key(model, family)
    if key not in _CACHE:
        _CACHE[key] = _prove_all(model, family)
    proven, positions, ends = _CACHE[key]
    blocks = []
    for i, block in enumerate(real):
        kind = kind_of(block)
        if kind not in proven:
            blocks.append(Block(paths[i], refused={c: f"no block like layer {i} ({kind[0]}) could be proven"
                                                   for c in COMPONENTS if c != "resid_pre"}))
            continue
        heads, widths = dims_of(model.config, block, paths[i])
        if proven[kind].stream:   # this model's own stream count
            widths["resid"] = proven[kind].stream.width(model.config, d_model)
        scales, refused = _own_scales(model, real, i, proven[kind])
        blocks.append(_with_ends(replace(proven[kind], paths=paths[i], heads=heads, widths=widths, scales=scales,
                                         refused=refused), ends, i, len(real)))
    return layers, blocks, positions


def _own_scales(model, blocks, layer: int, block: Block) -> tuple[dict, dict]:
    """``(scales, refused)`` of real block ``layer``: a scaled addition's number read from the
    block's own attribute; a weighted addition's weights measured on this model (a forward, and
    one more per weighted component).

    >>> import reftgraph as rg
    >>> rg.models.tiny("beam").arch.blocks[1].scales["attn_out"][1][:2].tolist()  # Beam: 1 / sqrt(2 * 2)
    [0.5, 0.5]
    """
    scales, refused = {}, dict(block.refused)
    for c, (how, _) in block.scales.items():
        if isinstance(how, str):
            scales[c] = (how, float(getattr(blocks[layer], how)))
    weighings = {c: how for c, (how, _) in block.scales.items() if not isinstance(how, str)}   # (Weighing)
    if not weighings:
        return scales, refused
    if any(p.is_meta for p in model.parameters()):
        why = "a weighted addition's weights are measured on the model's own weights, and this model has none loaded"
        refused.update({c: f"{why} (meta tensors)" for c in (*weighings, "mlp_in")})
        return scales, refused
    vocab, first = model.get_input_embeddings().num_embeddings, next(model.parameters())
    low = first.dtype in (torch.float16, torch.bfloat16)     # (rounding: more tokens, a looser check)
    ids = torch.randint(3, max(4, min(vocab, 259)), (8, 64) if low else (2, SEQ),
                        generator=torch.Generator().manual_seed(2)).to(first.device)
    with feeding_decoder(model):     # several prompts: weights that depend on the input would not hold for all
        rec = record(model, blocks, layer, ids)[0]
        for c, how in weighings.items():
            beta = _moved_per_unit(model, blocks, layer, ids, rec, how, 2e-2 if low else 1e-4)
            if beta is None:
                why = (f"the weights of {c} proven on the tiny instance do not hold on layer {layer} of this model "
                       "(adding to it does not move the sum by one weight per dimension on every token)")
                refused.update({c: why, **({"mlp_in": why} if c == "mlp_out" else {})})
            else:
                scales[c] = (how, beta)
    return scales, refused


def _moved_per_unit(model, blocks, layer: int, ids, rec: Record, how, tol: float) -> Optional[torch.Tensor]:
    """``beta``: how far the sum moves per unit added to the weighed module's output, per
    dimension (one more forward, the addition as large as the sum, so that rounding in a half-
    precision model stays small beside it); None unless it is the same on every token."""
    total = value(rec, how.total)
    delta = torch.ones(total.shape[-1], dtype=torch.float32, device=total.device) * (1 + total.float().abs().mean())
    new = record(model, blocks, layer, ids, edit=(how.added[0], lambda t: t + delta.to(t.dtype)))[0]
    moved = (value(new, how.total).float() - total.float()).reshape(-1, total.shape[-1]) / delta
    beta = moved.mean(0)
    if bool((beta.abs() <= 1e-6).any()) or (moved - beta).abs().max() > tol * (1 + beta.abs().max()):
        return None
    return beta


def _refuse_replaced(block: Block, model, before: dict) -> Block:
    """``block`` with every component refused whose module the model replaced during its
    forwards (BigBird switches its attention type): nnsight would edit the module it wrapped."""
    replaced = {name for name, m in model.named_modules() if before.get(name) is not m}
    if not replaced:
        return block
    refused = dict(block.refused)
    for c in COMPONENTS:
        where = c not in refused and component(c).address(c, block)
        if where and where.path and not where.root and any(n.endswith(f".{where.path}") for n in replaced):
            refused[c] = (f"the model replaces {where.path!r} during its forward (a switch of attention type), "
                          "so an edit would reach a module that no longer runs")
    return replace(block, refused=refused)


def _with_ends(block: Block, ends: dict, layer: int, n_layers: int) -> Block:
    """``block`` with the stream's ends it holds (``embed`` on the first, ``logits_in`` and
    ``logits`` on the last) and the refusal of the others."""
    refused, here, stages = dict(block.refused), {}, dict(block.stages)
    for name, at in END_COMPONENTS.items():
        where = at % n_layers
        if isinstance(ends.get(name), str) or name not in ends:    # refused on the model: on every layer
            refused[name] = ends.get(name, "not proven on this model")
        elif layer != where:
            refused[name] = (f"{name} is {'before the first' if at == 0 else 'after the last'} block: "
                             f"layer {where} (or leave the layer out)")
        else:
            here[name] = ends[name]
            stages[name] = -1 if at == 0 else 1e6 + STAGES[name]   # before the block's input, after its output
    return replace(block, refused=refused, ends=here, stages=stages)


def _prove_all(model, family) -> dict:
    try:
        tiny = _tiny_instance(model, family)
    except Exception:  # noqa: BLE001 - any config the shrinker cannot build: prove on the model itself
        if any(p.is_meta for p in model.parameters()):
            return {}, ("explicit", {}), {}
        tiny = model
    d_model = getattr(tiny.config, "hidden_size", None) or tiny.get_input_embeddings().embedding_dim
    _, paths = read_tree(tiny, d_model, family)
    blocks = blocks_of(tiny, family)[1]
    vocab = tiny.get_input_embeddings().num_embeddings
    ids = torch.randint(3, max(4, min(vocab, 259)), (1, SEQ), generator=torch.Generator().manual_seed(0))
    proven = {}
    was_training = tiny.training
    tiny.eval()
    modules = dict(tiny.named_modules())
    with feeding_decoder(tiny):   # (an encoder-decoder: its decoder reads the same tokens)
        try:
            for i, block in enumerate(blocks):
                kind = kind_of(block)
                if kind not in proven:
                    proven[kind] = _prove_kind(tiny, blocks, i, ids, paths[i])
            proven = {kind: _refuse_replaced(b, tiny, modules) for kind, b in proven.items()}
            positions = prove_positions(tiny, ids)
            try:
                ends = prove_ends(tiny, blocks, ids)
            except Exception as err:  # noqa: BLE001 - ends the checks cannot run on are refused, not trusted
                ends = {name: f"the proofs could not run ({type(err).__name__}: {err})" for name in END_COMPONENTS}
        finally:
            tiny.train(was_training)
    return proven, positions, ends
