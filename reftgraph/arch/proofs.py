"""Prove what each component means on one architecture, numerically, before anyone uses it.

>>> import reftgraph as rg
>>> block = rg.models.tiny("gpt_neox").arch.blocks[0]
>>> block.style, block.qkv_layout, sorted(block.refused)
('parallel', 'per_head', ['resid_mid'])
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

from ..core.sites import COMPONENTS, HEAD_COMPONENTS
from .positions import prove_positions
from .qkv import FUSED_LAYOUTS, slicer
from .styles import STYLES, Record
from .tree import BlockPaths, blocks_of, kind_of, linear_shape, read_tree

__all__ = ["Block", "prove", "dims_of", "forget"]

SEQ = 6          # tokens in the proof forward
POS = 2          # the position that locality checks edit


@dataclass(frozen=True)
class Block:
    """One block's components, proven: module paths, style, heads, widths and refusals.

    >>> import reftgraph as rg
    >>> b = rg.models.tiny("llama").arch.blocks[0]
    >>> b.style, b.attn_out, b.heads, b.widths["head_out"], b.refused
    ('sequential', 'self_attn', (4, 2), 8, {})

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


# -- dims ------------------------------------------------------------------

def _n_heads(config) -> Optional[int]:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _n_kv_config(config) -> Optional[int]:
    for key in ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 if getattr(config, "multi_query", False) is True else None


def _width(model) -> int:
    return getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim


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


# -- recording ---------------------------------------------------------------

def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _hidden_in(args, kwargs):
    """The hidden states a module is called with: its first positional tensor, else ``hidden_states=``."""
    t = _first_tensor(args) if args else None
    if t is None:
        t = kwargs.get("hidden_states", next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None))
    return t


def _copy(t):
    return None if t is None else t.detach().clone()   # blocks may edit a sub-layer's output in place (Falcon)


def _record(model, blocks, layer: int, ids, edit=None) -> tuple[Record, Optional[torch.Tensor], list]:
    """One forward with every module of block ``layer`` recorded (and ``edit`` applied).

    ``edit = (path, fn)`` replaces the first tensor of that module's output by ``fn(t)``."""
    block = blocks[layer]
    rec = Record(pre=None, post=None)
    order, handles, nxt = [], [], {}

    def pre_hook(path):
        def hook(module, args, kwargs):
            t = _hidden_in(args, kwargs)
            rec.calls[path] = rec.calls.get(path, 0) + 1
            if path not in rec.inputs:
                rec.inputs[path] = _copy(t)
                order.append((path, "input"))
        return hook

    def post_hook(path):
        def hook(module, args, kwargs, out):
            if edit is not None and edit[0] == path and rec.calls.get(path) == 1:
                t = _first_tensor(out)
                new = edit[1](t)
                out = (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
            if path not in rec.outputs:
                rec.outputs[path] = _copy(_first_tensor(out))
                if path == "" and isinstance(out, tuple) and type(out) is not tuple:
                    rec.outputs[path] = type(out).__name__   # a named output the engine cannot rebuild
                order.append((path, "output"))
            return out
        return hook

    try:
        for path, module in block.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
        if layer + 1 < len(blocks):
            def next_input(module, args, kwargs):
                nxt.setdefault("x", _copy(_hidden_in(args, kwargs)))

            handles.append(blocks[layer + 1].register_forward_pre_hook(next_input, with_kwargs=True))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rec.pre, rec.post = rec.inputs.get(""), rec.outputs.get("")
    return rec, nxt.get("x"), order


# -- the checks --------------------------------------------------------------

def _style(model, blocks, layer, ids, rec, paths):
    """``(style, attn_out, mlp_out)`` or ``(None, reasons)``; the edit checks included."""
    reasons = []
    for style in STYLES:
        found = style.find(rec, paths)
        if isinstance(found, str):
            reasons.append(f"{style.name}: {found}")
            continue
        attn_out, mlp_out = found
        bad = _edit_moves(model, blocks, layer, ids, rec, paths, style, attn_out, mlp_out)
        if bad:
            reasons.append(f"{style.name}: {bad}")
            continue
        return style, attn_out, mlp_out
    return None, "; ".join(reasons)


def _edit_moves(model, blocks, layer, ids, rec, paths, style, attn_out, mlp_out) -> str:
    """Why adding to attn_out / mlp_out does not move the stream by exactly the addition ('' when it does)."""
    for component, path, moves in (("attn_out", attn_out, style.attn_moves), ("mlp_out", mlp_out, "post")):
        if not path:
            continue
        if rec.calls.get(path, 0) != 1:
            return f"{component} module {path!r} runs {rec.calls.get(path, 0)} times per block"
        if moves == "mid" and not paths.mlp:
            moves = "post"
        delta = torch.randn(rec.out(path).shape[-1], generator=torch.Generator().manual_seed(1))
        new, _, _ = _record(model, blocks, layer, ids, edit=(path, lambda t: t + delta))
        before, after = (rec.mid(paths.mlp_in), new.mid(paths.mlp_in)) if moves == "mid" else (rec.post, new.post)
        want = None if before is None else before + delta
        if not Record.close(after, want):
            return (f"adding to {component} ({path}) does not move resid_{moves} by the same amount "
                    f"({Record.gap(after, want)})")
    return ""


def _head_changes(model, blocks, layer, ids, base, paths, proj_path, get_put, index, scale=1.0):
    """How head_out moves (and where) when ``index`` of the q/k/v view is edited; ``base`` is the clean record."""
    get, put = get_put
    delta_gen = torch.Generator().manual_seed(2)

    def fn(t):
        view = get(t).clone()
        view[index] = view[index] + scale * torch.randn(view[index].shape, generator=delta_gen) * (1 + t.std())
        return put(t, view)

    new, _, _ = _record(model, blocks, layer, ids, edit=(proj_path, fn))
    b, n = base.inp(paths.attn_proj), new.inp(paths.attn_proj)
    diff = (n - b)[0]
    return diff, (diff.abs() > 1e-5 * (1 + b.abs().max())).nonzero().tolist()


def _locality(model, blocks, layer, ids, paths, heads, widths, layout) -> dict:
    """component -> failure ('' when its locality checks pass) for one q/k/v layout."""
    nq, nkv = heads
    dh = widths["head_out"]
    result = {}
    base, _, _ = _record(model, blocks, layer, ids)
    for component in "qkv":
        if component not in widths:
            continue
        proj = paths.qkv if isinstance(paths.qkv, str) else paths.qkv["qkv".index(component)]
        try:
            view = slicer(layout, component, heads, (widths["q"], widths.get("k", widths["q"])))
        except ValueError as err:
            result[component] = str(err)
            continue
        n = nq if component == "q" else nkv
        head = n - 1
        diff, changed = _head_changes(model, blocks, layer, ids, base, paths, proj, view, (0, POS, head))
        moved = {(p, c // dh) for p, c in changed}   # (position, head) of head_out that moved
        if component == "q":
            want = {(POS, head)}
            ok = moved == want
            expect = f"only head {head} at position {POS}"
        else:
            group = {h for h in range(nq) if h // (nq // nkv) == head}
            ok = bool(moved) and {h for _, h in moved} == group and all(p >= POS for p, _ in moved) and any(
                p > POS for p, _ in moved)
            expect = f"heads {sorted(group)} at positions >= {POS}"
            if ok and component == "v":
                twice, _ = _head_changes(model, blocks, layer, ids, base, paths, proj, view, (0, POS, head),
                                         scale=2.0)
                ok = Record.close(twice, 2 * diff)
                expect += " (linearly)"
        got = sorted({h for _, h in moved})
        result[component] = "" if ok else (f"editing {component} of {'head' if component == 'q' else 'key-value head'} "
                                           f"{head} at position {POS} should move head_out of {expect}; it moved heads "
                                           f"{got} at positions {sorted({p for p, _ in moved})}")
    return result


def _prove_kind(model, blocks, layer, ids, paths: BlockPaths) -> Block:
    try:
        return _prove_block(model, blocks, layer, ids, paths)
    except Exception as err:  # noqa: BLE001 - a block the checks cannot run on is refused, not trusted
        why = f"the proofs could not run on this block ({type(err).__name__}: {err})"
        return Block(paths, refused={c: why for c in COMPONENTS if c not in ("resid_pre", "resid_post")})


def _widths_agree(widths: dict) -> dict:
    """Reasons to refuse q/k/v whose per-head widths cannot be a query, key and value."""
    out = {}
    if "q" in widths and "k" in widths and widths["q"] != widths["k"]:
        out["q"] = out["k"] = (f"q has {widths['q']} dims per head but k {widths['k']}: the projection carries "
                               "more than the query (e.g. a gate)")
    if "v" in widths and widths.get("head_out") not in (None, widths["v"]):
        out["v"] = f"v has {widths['v']} dims per head but head_out {widths['head_out']}"
    return out


def _prove_block(model, blocks, layer, ids, paths: BlockPaths) -> Block:
    config = model.config
    heads, widths = dims_of(config, blocks[layer], paths)
    rec, nxt, order = _record(model, blocks, layer, ids)
    if rec.calls.get("", 0) != 1:
        why = f"the block runs {rec.calls.get('', 0)} times per forward; an edit would reach its first run only"
        return Block(paths, refused={c: why for c in COMPONENTS})
    refused = {}
    want = (ids.shape[0], ids.shape[1], _width(model))
    for component, value in (("resid_pre", rec.pre), ("resid_post", rec.post)):
        if isinstance(value, str):
            why = f"the block returns a {value} (a named tuple), which an edit of its output cannot rebuild"
            return Block(paths, refused={c: why for c in COMPONENTS})
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            why = (f"the block's {'input' if component == 'resid_pre' else 'output'} is {got}, not [batch, tokens, "
                   f"width] = {list(want)} (the blocks do not see one vector per input token)")
            return Block(paths, refused={c: why for c in COMPONENTS})
    stages = {(p, io): i for i, (p, io) in enumerate(order)}
    if nxt is not None and not Record.close(rec.post, nxt):
        refused["resid_post"] = f"check resid_post[{layer}] == resid_pre[{layer + 1}] failed ({Record.gap(rec.post, nxt)})"
    style, attn_out, mlp_out = None, None, None
    found = _style(model, blocks, layer, ids, rec, paths) if paths.attn or paths.mlp else (None, None)
    if not paths.attn and not paths.mlp:
        for c in ("resid_mid", "attn_out", "mlp_out"):
            refused[c] = _no("attention or MLP", paths)
    elif found[0] is None:
        why = f"no block style's identities hold ({found[1]})"
        for c in ("resid_mid", "attn_out", "mlp_out"):
            refused[c] = why
    else:
        style, attn_out, mlp_out = found[0], found[1], found[2]
        if not attn_out:
            refused["attn_out"] = refused["resid_mid"] = _no("attention", paths)
        elif not style.has_mid:
            refused["resid_mid"] = ("parallel block: attention and MLP both read resid_pre, so no stream lies "
                                    "between them (use resid_pre or resid_post)")
        if not mlp_out:
            refused["mlp_out"] = _no("MLP", paths)
    # head_out and mlp_act
    if not paths.attn:
        refused["head_out"] = _no("attention", paths)
    elif not paths.attn_proj or "head_out" not in widths:
        refused["head_out"] = (f"no output projection from {heads[0]} heads back to the model width found "
                               f"in {paths.attn!r}")
    elif attn_out != paths.attn_proj and not Record.close(rec.out(paths.attn_proj), rec.out(paths.attn)):
        refused["head_out"] = (f"check head_out through {paths.attn_proj} == the output of {paths.attn} failed "
                               f"({Record.gap(rec.out(paths.attn_proj), rec.out(paths.attn))})")
    if not paths.mlp:
        refused["mlp_act"] = _no("MLP", paths)
    elif not paths.mlp_down or "mlp_act" not in widths:
        refused["mlp_act"] = (f"no single down projection in {paths.mlp!r} (a mixture of experts has one per "
                              "expert); use mlp_out")
    elif mlp_out != paths.mlp_down and not Record.close(rec.out(paths.mlp_down), rec.out(paths.mlp)):
        refused["mlp_act"] = (f"check {paths.mlp_down} output == the output of {paths.mlp} failed "
                              f"({Record.gap(rec.out(paths.mlp_down), rec.out(paths.mlp))})")
    # q / k / v
    layout = None
    if "head_out" in refused:
        for c in "qkv":
            refused[c] = f"needs head_out, which is refused: {refused['head_out']}"
    else:
        layouts = ["separate"] if isinstance(paths.qkv, tuple) else list(FUSED_LAYOUTS) if paths.qkv else []
        results = [(lay, _locality(model, blocks, layer, ids, paths, heads, widths, lay)) for lay in layouts]
        best = max(results, key=lambda r: sum(not v for v in r[1].values()), default=None)
        mismatch = _widths_agree(widths)
        for c in "qkv":
            if c in mismatch:
                refused[c] = mismatch[c]
            elif best is None or c not in best[1]:
                refused[c] = (f"no {c} projection found in {paths.attn!r} (children: "
                              f"{', '.join(n for n, _ in _module(blocks[layer], paths.attn).named_children())})")
            elif best[1][c]:
                refused[c] = f"locality check failed ({best[0]} layout): {best[1][c]}"
        if best is not None and any(not v for v in best[1].values()):
            layout = best[0]
    flat = set()
    for c, path, io in (("attn_out", attn_out, "out"), ("mlp_out", mlp_out, "out"), ("mlp_act", paths.mlp_down, "inp"),
                        ("head_out", paths.attn_proj, "inp")):
        value = getattr(rec, io)(path)
        if c in refused or value is None or value.dim() == rec.pre.dim():
            continue
        if c in ("mlp_out", "mlp_act") and value.dim() == 2 and value.shape[0] == rec.pre.shape[0] * rec.pre.shape[1]:
            flat.add(c)   # the block flattens tokens around its MLP (OPT, Llama 4): viewed back per token
        else:
            refused[c] = (f"the block reshapes tokens before {path!r} (it sees {list(value.shape)}, not "
                          "[batch, tokens, width])")
    for c in COMPONENTS:
        if c not in refused and c in HEAD_COMPONENTS + ("mlp_act",) and c not in widths:
            refused[c] = f"its width could not be read off {paths}"
    component_stage = _component_stages(stages, paths, attn_out, mlp_out)
    return Block(paths, style.name if style else None, attn_out, mlp_out, layout, heads, widths, refused,
                 component_stage, frozenset(flat))


def _component_stages(stages, paths, attn_out, mlp_out) -> dict:
    hooks = {"resid_pre": ("", "input"), "resid_post": ("", "output"), "attn_out": (attn_out, "output"),
             "resid_mid": (attn_out, "output"), "mlp_out": (mlp_out, "output"),
             "mlp_act": (paths.mlp_down, "input"), "head_out": (paths.attn_proj, "input")}
    if isinstance(paths.qkv, tuple):
        hooks.update({c: (p, "output") for c, p in zip("qkv", paths.qkv)})
    elif paths.qkv:
        hooks.update({c: (paths.qkv, "output") for c in "qkv"})
    return {c: stages[h] for c, h in hooks.items() if h in stages}


def _no(what: str, paths: BlockPaths) -> str:
    return f"this block has no {what} (its modules: {', '.join(paths.children)})"


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
    for layers in (None, len(blocks)):   # more layers when the shrunk pattern lost a kind of block
        torch.manual_seed(0)
        tiny = AutoModelForCausalLM.from_config(shrink(model.config, n_layers=layers), dtype=torch.float32).eval()
        if kinds <= {kind_of(b) for b in blocks_of(tiny, family)[1]}:
            return tiny
    return tiny


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
    proven, positions = _CACHE[key]
    blocks = []
    for i, block in enumerate(real):
        kind = kind_of(block)
        if kind not in proven:
            blocks.append(Block(paths[i], refused={c: f"no block like layer {i} ({kind[0]}) could be proven"
                                                   for c in COMPONENTS if c != "resid_pre"}))
            continue
        heads, widths = dims_of(model.config, block, paths[i])
        blocks.append(replace(proven[kind], paths=paths[i], heads=heads, widths=widths))
    return layers, blocks, positions


def _prove_all(model, family) -> dict:
    try:
        tiny = _tiny_instance(model, family)
    except Exception:  # noqa: BLE001 - any config the shrinker cannot build: prove on the model itself
        if any(p.is_meta for p in model.parameters()):
            return {}, ("explicit", {})
        tiny = model
    d_model = getattr(tiny.config, "hidden_size", None) or tiny.get_input_embeddings().embedding_dim
    _, paths = read_tree(tiny, d_model, family)
    blocks = blocks_of(tiny, family)[1]
    vocab = tiny.get_input_embeddings().num_embeddings
    ids = torch.randint(3, max(4, min(vocab, 259)), (1, SEQ), generator=torch.Generator().manual_seed(0))
    proven = {}
    was_training = tiny.training
    tiny.eval()
    try:
        for i, block in enumerate(blocks):
            kind = kind_of(block)
            if kind not in proven:
                proven[kind] = _prove_kind(tiny, blocks, i, ids, paths[i])
        positions = prove_positions(tiny, ids)
    finally:
        tiny.train(was_training)
    return proven, positions
