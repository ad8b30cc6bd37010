"""Receiver inputs: the copy of the residual stream that one reader reads, before its norm.

>>> import reftgraph as rg
>>> arch = rg.models.tiny("llama").arch      # 4 query heads, 2 key-value heads
>>> arch.heads("q_in"), arch.heads("k_in"), arch.width("q_in"), arch.hook("mlp_in", 0).path
(4, 2, 32, 'post_attention_layernorm')

``q_in``, ``k_in`` and ``v_in`` are, per head (key-value heads for ``k_in``/``v_in``), the
stream that head's query, key or value reads: ``resid_pre``, before the block's input
norm. Each head gets its own copy, so one head can read a different stream than its
neighbours (what edge circuits need). Editing the copy of head h recomputes head h's
slice of the projection from the norm of the new copy: the projection output becomes
``raw + proj_h(norm(new)) - proj_h(norm(resid_pre))``, exact when nothing changed, and
the other heads keep theirs. ``mlp_in`` is the stream the MLP reads before its norm
(``resid_mid`` in sequential blocks, ``resid_pre`` in parallel ones).

Proofs, on a tiny instance: the projection (or MLP) reads ``norm(stream)`` for one norm of
the block (or the stream itself); moving every head's copy by d gives the projection output
the model gives when its block input moves by d; moving head h's copy moves head h's slice
alone. For ``mlp_in``: moving it moves the block output only through the MLP.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..qkv import slicer
from ..tree import is_norm, linear_shape
from .base import Address, Component, Context, first, no_module, walk, with_first
from .heads import POS, qkv_slicer
from .outputs import per_token

__all__ = ["HeadInputs", "MLPInput", "head_input_grads", "head_input_view", "rms_vjp", "stream_input_view"]

_READS = {"q_in": "q", "k_in": "k", "v_in": "v"}


def _reader_norm(ctx: Context, reader: str, stream) -> tuple[Optional[str], str]:
    """``(norm path or '' for none, '')`` when the input of the module ``reader`` is
    ``norm(stream)`` for one norm of the block run before it (or ``stream`` itself);
    ``(None, why)`` otherwise."""
    rec = ctx.rec
    fed = rec.inp(reader)
    if fed is None or stream is None:
        return None, "its input was not recorded"
    if rec.close(fed, stream):
        return "", ""
    block, found = ctx.blocks[ctx.layer], None
    norms = {path for path, module in block.named_modules() if path and is_norm(module)}
    for path in rec.inputs:          # in call order: the last norm of the stream before the reader
        if path == reader:
            break
        if path in norms and rec.calls.get(path) == 1 and rec.close(rec.out(path), fed) \
                and rec.close(rec.inp(path), stream):
            found = path
    if found is not None:
        return found, ""
    return None, f"it reads neither the stream nor one norm of it ({rec.gap(fed, stream)} from the stream)"


def _replacing_input(fn):
    """A forward pre-hook (``with_kwargs=True``) that replaces a module's hidden-states input by ``fn(input)``."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _with_input(ctx: Context, fn, path: str):
    """The first output of ``path`` in a forward whose block input is replaced by ``fn(input)``."""
    block, seen = ctx.blocks[ctx.layer], {}

    def grab(module, args, out):
        seen.setdefault("out", first(out).detach().clone())

    handles = [block.register_forward_pre_hook(_replacing_input(fn), with_kwargs=True),
               walk(block, path).register_forward_hook(grab)]
    try:
        with torch.no_grad():
            ctx.model(input_ids=ctx.ids, attention_mask=torch.ones_like(ctx.ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen.get("out")


def head_input_view(heads: int, head_get, head_put):
    """``(get, put)`` of one head input: each head's own copy of the stream, and its
    projection slice recomputed from the copy.

    >>> import torch
    >>> proj = torch.nn.Linear(4, 6)
    >>> get, put = head_input_view(2, lambda t: t.unflatten(-1, (2, 3)), lambda t, new: new.flatten(-2))
    >>> pre = torch.randn(1, 5, 4)
    >>> raw = proj(pre)
    >>> new = get(raw, pre).clone(); new[:, :, 1] += 1          # head 1 reads another stream
    >>> out = put(raw, new, get(raw, pre), None, proj).unflatten(-1, (2, 3))
    >>> torch.equal(out[:, :, 0], raw.unflatten(-1, (2, 3))[:, :, 0]), torch.allclose(out[:, :, 1], proj(pre + 1)[..., 3:])
    (True, True)

    ``get(raw, pre)`` -> ``[B, S, heads, d_model]`` (the stream, once per head); ``put(raw,
    new, old, norm, proj)`` moves each head's slice of the projection output ``raw`` from what
    its copy ``old`` gives to what ``new`` gives (``norm`` may be None). The engine keeps the
    copies between edits (``old`` is what the previous edit wrote, or ``get``'s value), so
    edits of one head input compose.
    """
    def get(raw, pre):
        return pre.unsqueeze(2).expand(-1, -1, heads, -1)

    def read(x, norm, proj):
        return _per_head(proj, norm(x) if norm is not None else x, head_get)     # [B, S, head, dh]

    def put(raw, new, old, norm, proj):
        # raw's slice equals read(old) as a function of the stream and the weights, so both are
        # taken without gradient: the gradient then reaches the stream and the weights through
        # read(new) alone, exactly, and the backward skips the two paths that would cancel
        t = first(raw)
        with torch.no_grad():
            before = read(old, norm, proj)
        new_part = read(new.to(old.dtype), norm, proj) - before
        return with_first(raw, head_put(t, head_get(t).detach() + new_part.to(t.dtype)))

    return get, put


def head_input_grads(x, grads, norm, projs, head_gets, rms=None) -> list:
    """Per projection, the gradient ``[..., heads, d]`` at each head's copy of the stream ``x``,
    from ``grads`` ``[..., heads, dh]`` at the heads' slices of ``projs``: what a probe on the
    copies gives, without running one copy per head through the forward.

    >>> import torch
    >>> norm, proj = torch.nn.LayerNorm(4), torch.nn.Linear(4, 6)
    >>> head_get = lambda t: t.unflatten(-1, (2, 3))
    >>> x, g = torch.randn(1, 5, 4), torch.randn(1, 5, 2, 3)
    >>> copies = x.unsqueeze(2).expand(-1, -1, 2, -1).clone().requires_grad_()
    >>> want, = torch.autograd.grad(_per_head(proj, norm(copies), head_get), copies, g)
    >>> torch.allclose(head_input_grads(x, [g], norm, [proj], [head_get])[0], want, atol=1e-6)
    True
    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> rms = LlamaRMSNorm(4, eps=1e-6); _ = torch.nn.init.uniform_(rms.weight)
    >>> want, = torch.autograd.grad(_per_head(proj, rms(copies), head_get), copies, g)
    >>> got = head_input_grads(x, [g], rms, [proj], [head_get], rms=(rms.weight.detach(), 1e-6))[0]
    >>> torch.allclose(got, want, atol=1e-6)
    True

    Every copy is ``x`` ``[..., d]``, read as :func:`head_input_view` reads it: each projection
    applied to ``norm`` of the copy. The projections' slices are linear, so a head's gradient is
    the norm's vector-Jacobian
    product at ``x`` of ``W_h^T grad_h``: the norm's backward once per head, batched over the
    heads of every projection (``torch.func.vmap``), instead of a norm and a projection per
    head forward and back. With ``rms = (c, eps)``, the norm is known to compute
    ``c * x / sqrt(mean(x^2) + eps)`` and its vector-Jacobian product is written out for every
    head at once (what the vmap gives, without its overhead).
    """
    x = x.detach()
    us, linear = [], []
    for grad, proj, head_get in zip(grads, projs, head_gets):
        module = getattr(proj, "_module", proj)          # (an nnsight envoy holds its module)
        if linear_shape(module) is not None:
            weight = (module.weight.T if isinstance(module, torch.nn.Linear) else module.weight).detach()  # [in, out]
            folded = rms is not None and norm is not None     # the norm's backward folded into the weights
            us.append(_rms_linear_grads(x, grad, weight, head_get, *rms) if folded
                      else _back_through(grad.to(weight.dtype), head_get(weight)))
            linear.append(folded)
            continue
        linear.append(False)
        z = (norm(x) if norm is not None else x).detach()
        z = z.unsqueeze(-2).expand(*z.shape[:-1], grad.shape[-2], z.shape[-1]).clone().requires_grad_()
        with torch.enable_grad():
            us.append(torch.autograd.grad(_per_head(proj, z, head_get), z, grad.to(z.dtype))[0])
    if norm is None:
        return us
    if rms is not None:     # (a projection that is no linear map: its W^T g taken by autograd above)
        return [u if done else rms_vjp(x, u, *rms) for u, done in zip(us, linear)]
    out, vjp = torch.func.vjp(getattr(norm, "_module", norm), x)
    every = torch.vmap(lambda v: vjp(v)[0], in_dims=-2, out_dims=-2)(torch.cat(us, -2).to(out.dtype))
    return list(every.split([u.shape[-2] for u in us], -2))


def _back_through(grad, w):
    """``W_h^T grad_h`` for every head: ``grad`` ``[..., H, dh]``, ``w`` ``[d, H, dh]`` -> ``[..., H, d]``
    (one batched matrix product over the heads; einsum is slower on these shapes)."""
    lead, (h, dh) = grad.shape[:-2], grad.shape[-2:]
    out = torch.bmm(grad.reshape(-1, h, dh).transpose(0, 1), w.permute(1, 2, 0))     # [H, M, d]
    return out.transpose(0, 1).unflatten(0, lead)


def _rms_linear_grads(x, grad, weight, head_get, c, eps: float):
    """Each head's gradient at its copy of ``x`` through ``y = c * x / r`` and its slice of a
    linear ``weight`` ``[d, out]`` (what :func:`rms_vjp` gives for ``u = W_h^T grad_h``): ``c``
    folded into the weight's rows, and ``x . (c * u)`` taken in the head's own width as
    ``grad_h . W_h^T (c * x)``."""
    xf, g = x.float(), grad.float()
    wc = weight.float() * c.float().to(weight.device)[:, None]                       # [d, out]
    return _rms_back(xf, _back_through(g, head_get(wc)), (head_get(xf @ wc) * g).sum(-1, keepdim=True), eps).to(x.dtype)


def _rms_back(xf, cu, dot, eps: float):
    """``cu / r - x dot / (d r^3)`` (in place in ``cu`` ``[..., n, d]``): the RMS norm's
    vector-Jacobian product, from ``cu = c * u`` and ``dot = x . cu`` ``[..., n, 1]``."""
    r = torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps).unsqueeze(-2)             # [..., 1, 1]
    return cu.div_(r).addcmul_(xf.unsqueeze(-2), dot / (xf.shape[-1] * r.pow(3)), value=-1)


def rms_vjp(x, u, c, eps: float):
    """The vector-Jacobian products ``[..., n, d]`` of ``y = c * x / sqrt(mean(x^2) + eps)`` at
    ``x`` ``[..., d]`` for ``n`` vectors ``u`` ``[..., n, d]`` at once (in float32, returned in
    ``x``'s dtype).

    >>> import torch
    >>> x, u, c = torch.randn(3, 8), torch.randn(3, 2, 8), torch.rand(8)
    >>> _, vjp = torch.func.vjp(lambda t: c * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), x)
    >>> want = torch.stack([vjp(u[:, i])[0] for i in range(2)], 1)
    >>> torch.allclose(rms_vjp(x, u, c, 1e-6), want, atol=1e-6)
    True

    With ``r = sqrt(mean(x^2) + eps)``: ``dy/dx^T u = c u / r - x (x . c u) / (d r^3)``.
    """
    xf = x.float()
    cu = u.float() * c.float().to(x.device)
    return _rms_back(xf, cu, (cu * xf.unsqueeze(-2)).sum(-1, keepdim=True), eps).to(x.dtype)


def _per_head(proj, x, head_get):
    """``[..., heads, dh]``: for each head, its slice of ``proj`` applied to its own copy
    ``x[..., head, :]``. A linear map (``nn.Linear``, GPT-2's ``Conv1D``) is applied per head
    from its weight slices; any other module to every copy, keeping each head's own slice."""
    module = getattr(proj, "_module", proj)          # (an nnsight envoy holds its module)
    if linear_shape(module) is not None:
        weight = module.weight.T if isinstance(module, torch.nn.Linear) else module.weight   # [in, out]
        y = torch.einsum("...hi,ihe->...he", x, head_get(weight).to(x.dtype))
        bias = getattr(module, "bias", None)
        return y if bias is None else y + head_get(bias).to(x.dtype)
    return head_get(proj(x)).diagonal(dim1=-3, dim2=-2).movedim(-1, -2)


class HeadInputs(Component):
    """``q_in``, ``k_in``, ``v_in``: per head, the stream its query, key or value reads.

    >>> import reftgraph as rg
    >>> HeadInputs().address("k_in", rg.models.tiny("llama").arch.blocks[0]).path
    'self_attn.k_proj'
    """
    names = ("q_in", "k_in", "v_in")
    has_heads = True
    needs_proof = True

    def address(self, name, block) -> Address:
        qkv = block.paths.qkv
        path = qkv if isinstance(qkv, str) else qkv["qkv".index(_READS[name])] if qkv else None
        return Address(path, "output")

    def modules(self, name, block) -> tuple:
        norm = block.reads.get(name, "")
        return (norm or None, self.address(name, block).path)

    def heads(self, name, arch, block) -> int:
        nq, nkv = block.heads if block is not None and block.heads[0] else (arch.n_heads, arch.n_kv_heads)
        return nq if name == "q_in" else nkv

    def needs_pre(self, name, block) -> bool:
        return True

    def view(self, name, arch, block, layer):
        head_get, head_put = qkv_slicer(_READS[name], arch, block, layer)
        return head_input_view(arch.heads(name, layer), head_get, head_put)

    def prove(self, ctx: Context) -> None:
        for name, c in _READS.items():
            if c in ctx.refused:
                ctx.refused[name] = f"needs {c}, which is refused: {ctx.refused[c]}"
                continue
            why = self._prove(ctx, name, c)
            if why:
                ctx.refused[name] = why

    def _prove(self, ctx: Context, name: str, c: str) -> str:
        rec, paths, block = ctx.rec, ctx.paths, ctx.blocks[ctx.layer]
        proj = paths.qkv if isinstance(paths.qkv, str) else paths.qkv["qkv".index(c)]
        if rec.calls.get(proj) != 1:
            return f"{proj!r} runs {rec.calls.get(proj, 0)} times per block"
        norm, why = _reader_norm(ctx, proj, rec.pre)
        if norm is None:
            return f"{proj!r} does not read resid_pre through a norm: {why}"
        ctx.reads[name] = norm
        nq, nkv = ctx.heads
        heads = nq if c == "q" else nkv
        dims = (ctx.widths["q"], ctx.widths.get("k", ctx.widths["q"]))
        head_get, head_put = slicer(ctx.layout or "separate", c, ctx.heads, dims)
        get, put = head_input_view(heads, head_get, head_put)
        norm_module, proj_module = (walk(block, norm) if norm else None), walk(block, proj)
        raw, pre = rec.out(proj), rec.pre
        gen = torch.Generator().manual_seed(3)
        delta = torch.randn(pre.shape, generator=gen) * (1 + pre.std())
        copies = get(raw, pre)
        with torch.no_grad():
            same = put(raw, copies.clone(), copies, norm_module, proj_module)
            moved_all = put(raw, copies + delta.unsqueeze(2), copies, norm_module, proj_module)
            one = copies.clone()
            one[0, POS, heads - 1] += delta[0, POS]
            moved_one = put(raw, one, copies, norm_module, proj_module)
        if not torch.equal(first(same), raw):
            return f"recomputing {c} from unchanged copies changed it ({rec.gap(first(same), raw)})"
        got, want = head_get(first(moved_all)), head_get(_with_input(ctx, lambda x: x + delta, proj))
        if not rec.close(got, want):
            return (f"moving every head's copy by d should give the {c} the model computes from resid_pre + d "
                    f"({rec.gap(got, want)})")
        changed = (head_get(first(moved_one)) - head_get(raw)).abs().amax(-1)[0]     # [S, heads]
        moved = {tuple(x) for x in (changed > 1e-6).nonzero().tolist()}
        if moved != {(POS, heads - 1)}:
            return (f"moving the copy of head {heads - 1} at position {POS} should move that head's {c} alone; it "
                    f"moved (position, head) {sorted(moved)}")
        return ""


def stream_input_view():
    """``(get, put)`` of a stream copy that one reader reads through a norm it shares with
    others: ``get(raw, pre)`` -> ``pre``; ``put(raw, new, old, norm)`` moves the reader's
    input ``raw`` from ``norm(old)`` to ``norm(new)`` (the others keep reading ``norm(pre)``).

    >>> import torch
    >>> norm, pre = torch.nn.LayerNorm(4), torch.randn(1, 3, 4)
    >>> get, put = stream_input_view()
    >>> torch.allclose(put(norm(pre), pre + 1, get(norm(pre), pre), norm), norm(pre + 1))
    True
    """
    def put(raw, new, old, norm):   # (the gradient through norm(new) alone: see head_input_view)
        with torch.no_grad():
            shift = -norm(old)
        return with_first(raw, first(raw).detach() + (norm(new) + shift).to(first(raw).dtype))

    return (lambda raw, pre: pre), put


class MLPInput(Component):
    """``mlp_in``: the stream the MLP reads, before its norm.

    >>> import reftgraph as rg
    >>> MLPInput().address("mlp_in", rg.models.tiny("gpt2").arch.blocks[0])
    Address(path='ln_2', io='input', inner=())

    Where the MLP has a norm of its own, ``mlp_in`` is that norm's input. Where attention
    and the MLP read one norm (GPT-J, Falcon, Phi: parallel blocks), it is a copy of
    ``resid_pre`` and an edit recomputes the MLP's input from the norm of the new copy
    (:func:`stream_input_view`), leaving attention's input as it was.
    """
    names = ("mlp_in",)
    needs_proof = True

    def address(self, name, block) -> Address:
        norm = block.reads.get("mlp_in")
        if norm is None:
            return Address(None, "input")
        if "mlp_in_shared" in block.reads:
            return Address(block.paths.mlp_in, "input")
        return Address(norm or block.paths.mlp_in, "input")

    def modules(self, name, block) -> tuple:
        return (block.reads["mlp_in_shared"],) if "mlp_in_shared" in block.reads else ()

    def view(self, name, arch, block, layer):
        if "mlp_in_shared" in block.reads:
            return stream_input_view()
        return per_token() if name in block.flat else super().view(name, arch, block, layer)

    def needs_pre(self, name, block) -> bool:
        return name in block.flat or "mlp_in_shared" in block.reads

    def prove(self, ctx: Context) -> None:
        why = self._prove(ctx)
        if why:
            ctx.refused["mlp_in"] = why
            ctx.reads.pop("mlp_in", None)
            ctx.reads.pop("mlp_in_shared", None)

    def _prove(self, ctx: Context) -> str:
        rec, paths = ctx.rec, ctx.paths
        if not paths.mlp:
            return no_module("MLP", paths)
        if "mlp_out" in ctx.refused:
            return f"needs mlp_out, which is refused: {ctx.refused['mlp_out']}"
        stream = rec.pre if not ctx.style.has_mid else rec.out(ctx.norms["attn_out"]) if ctx.norms else \
            rec.mid(paths.mlp_in)
        norm, why = _reader_norm(ctx, paths.mlp_in, stream)
        if norm is None:
            return f"{paths.mlp_in!r} does not read the stream through a norm: {why}"
        if norm and rec.calls.get(norm) != 1:
            return f"its norm {norm!r} runs {rec.calls.get(norm)} times per block"
        ctx.reads["mlp_in"] = norm
        delta = torch.randn(stream.shape[-1], generator=torch.Generator().manual_seed(4)) * (1 + stream.std())
        at = norm or paths.mlp_in
        why = _moves_mlp_alone(ctx, at, lambda t: t + delta)
        if why and norm and not ctx.style.has_mid:   # one norm for attention and MLP: recompute the MLP's input
            module = walk(ctx.blocks[ctx.layer], norm)
            with torch.no_grad():
                shift = module(stream + delta) - module(stream)
            why = _moves_mlp_alone(ctx, paths.mlp_in, lambda t: t + shift.reshape(t.shape))
            if not why:
                ctx.reads["mlp_in_shared"] = norm
                return ""
            at = paths.mlp_in
        return f"moving the input of {at!r} should move the block output through the MLP alone; {why}" if why else ""


def _moves_mlp_alone(ctx: Context, path: str, fn) -> str:
    """'' when replacing the input of ``path`` by ``fn(input)`` moves the block output
    through the MLP alone (and moves it), else why not."""
    rec = ctx.rec
    new, _, _ = _record_input_edit(ctx, path, fn)
    norm = ctx.norms.get("mlp_out")    # Post-LN: the sum the norm after the MLP reads

    def sum_(r):
        return r.inp(norm) if norm else r.post

    c = ctx.scales.get("mlp_out", (None, 1.0))[1]    # a scaled addition adds c * the MLP's output
    parts = (ctx.mlp_out, *ctx.beside.values())      # (with the module the block adds beside it)

    def mlp(r):
        return c * sum(r.out(p).reshape(r.post.shape) for p in parts)
    post_gap = (sum_(new) - mlp(new)) - (sum_(rec) - mlp(rec))
    if rec.close(new.out(ctx.mlp_out), rec.out(ctx.mlp_out)):
        return "the MLP's output did not move"
    if not rec.close(post_gap, torch.zeros_like(post_gap)):
        return f"the stream moved outside the MLP too ({rec.gap(post_gap, torch.zeros_like(post_gap))})"
    return ""


def _record_input_edit(ctx: Context, path: str, fn):
    """The block recorded with the input of ``path`` replaced by ``fn(input)``."""
    from ..recording import record

    handle = walk(ctx.blocks[ctx.layer], path).register_forward_pre_hook(_replacing_input(fn), with_kwargs=True)
    try:
        return record(ctx.model, ctx.blocks, ctx.layer, ctx.ids)
    finally:
        handle.remove()
