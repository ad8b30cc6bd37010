"""Every component x op x position selector x padding side x family, against plain hooks.

The full matrix runs on llama / gpt2 / gpt_neox; a smaller one on Gemma 3 (norms after the
sub-layers), Phi-3 (fused q/k/v), GPT-J (parallel) and Qwen2-MoE (mixture of experts)."""

import pytest
import torch

import reftgraph as rg
from reftgraph.core.sites import END_COMPONENTS, KEY_COMPONENTS
from oracle import ABSENT, capture, encode, positions_of, real_positions, run_with

FAMILIES = ("llama", "gpt2", "gpt_neox")
MORE = ("gemma3_text", "phi3", "gptj", "qwen2_moe")
COMPONENTS = [c for c in rg.COMPONENTS if c not in KEY_COMPONENTS]   # attn_pattern: test_pattern.py
OPS = ("patch", "add", "set", "zero", "mean", "resample", "collect")
SELECTORS = ([0], [-2, 1], "last", "f2+l2", slice(1, None, 2), "all")
BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]  # same lengths as BASE, row by row
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return rg.models.tiny(request.param)


@pytest.fixture(scope="module", params=MORE)
def more(request):
    return rg.models.tiny(request.param)


def present(lm, component):
    """Whether the architecture defines ``component``; where it does not, the library refuses it."""
    if component not in ABSENT.get(lm.arch.family.name, ()):
        return True
    g = rg.Graph()
    g.add(rg.Site(component, layer=1), rg.Collect(), name="n")
    with pytest.raises(rg.SiteError, match=f"refuses {component} at layer 1"):
        g.run(lm, BASE)
    return False


def site_for(lm, component, selector, subspace):
    head = None
    if component in rg.core.sites.HEAD_COMPONENTS:
        head = (1, 0) if lm.arch.heads(component) > 1 else 0
    layer = None if component in END_COMPONENTS else 1     # the stream's ends have one layer each
    return rg.Site(component, layer=layer, positions=selector, head=head, subspace=subspace)


REFT = ("LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT")


def op_for(kind, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind in REFT:
        op = getattr(rg, kind)(width=width, rank=4, act="tanh" if "Di" in kind else "identity", seed=seed)
        with torch.no_grad():  # a non-zero bias, so every variant's edit is visible
            op.bias.normal_(generator=g)
        return op
    if kind == "patch":
        return rg.Patch(source="source")
    if kind == "add":
        return rg.Add(torch.randn(width, generator=g), scale=1.5, trainable=True)
    if kind == "set":
        return rg.Set(torch.randn(width, generator=g), trainable=True)
    if kind in ("zero", "mean", "resample"):
        return rg.Ablate(kind, seed=3)
    return rg.Collect()


def derangement(n, seed):
    g = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n, (1,), generator=g))
    perm = torch.randperm(n, generator=g)
    out = torch.empty_like(perm)
    out[perm] = perm.roll(shift)
    return out


def new_value(kind, op, cur, mean, source, other):
    """One slot's new value under a basic op: ``source()`` is the patched slot's value in the
    source prompt, ``other()`` the same slot of the row resampling takes it from."""
    if kind == "patch":
        return source()
    if kind == "add":
        return cur + op.scale * op.vector
    if kind == "set":
        return op.value
    if kind == "zero":
        return torch.zeros_like(cur)
    if kind == "mean":
        return mean
    return other()


def oracle_edit(kind, op, site, base_mask, src_tensor, src_mask):
    """An ``edit(t)`` for the oracle hooks, written with loops over rows and positions."""
    base_real, src_real = real_positions(base_mask), real_positions(src_mask) if src_mask is not None else None
    heads = list(site.head) if site.head is not None else None
    # a learned basis sees the whole width (its subspace = dims of its rank)
    dims = list(site.subspace) if site.subspace is not None and kind not in REFT else None

    def cut(x):  # [..] at one position -> the op's view
        x = x[heads] if heads is not None else x
        return x[..., dims] if dims is not None else x

    def paste(x, new):
        x = x.clone()
        if heads is None:
            if dims is None:
                return new.expand_as(x).clone()
            x[..., dims] = new
            return x
        inner = x[heads]
        if dims is None:
            inner = new.expand_as(inner)
        else:
            inner[..., dims] = new
        x[heads] = inner
        return x

    def edit(t):  # in float32, rounded to the model's dtype (the library's rule for half precision)
        dtype, t = t.dtype, t.float()
        slots = [(b, j, base_real[b][r]) for b in range(t.shape[0])
                 for j, r in enumerate(positions_of(site.positions, len(base_real[b])))]
        mean = torch.stack([cut(t[b, p]) for b, _, p in slots]).mean(0) if kind == "mean" else None
        perm = derangement(t.shape[0], op.seed) if kind == "resample" else None
        out = t.clone()
        for b, j, p in slots:
            cur = cut(t[b, p])
            if kind in REFT:
                new = reft_math(op, cur, site.subspace)
            else:
                new = new_value(kind, op, cur, mean, lambda: cut(src_tensor[b, src_real[b][positions_of(
                    site.positions, len(src_real[b]))[j]]].float()), lambda: cut(t[perm[b], base_real[perm[b]][
                        positions_of(site.positions, len(base_real[perm[b]]))[j]]]))
            out[b, p] = paste(t[b, p], new)
        return out.to(dtype)

    return edit


def reft_math(op, h, dims):
    """The ReFT edits of the paper, written out."""
    dims = list(range(op.rank)) if dims is None else list(dims)
    rt = op.Rt()[:, dims]
    b = op.bias[dims]
    act = torch.tanh if op.act_name == "tanh" else (lambda x: x)
    name = type(op).__name__
    if name in ("LoReFT", "NoReFT"):
        return h + (act(h @ op.weight[dims].T + b) - h @ rt) @ rt.T
    if name in ("DiReFT", "NoDiReFT"):
        return h + act(h @ op.weight[dims].T + b) @ rt.T
    if name == "ConsReFT":
        return h + (b - h @ rt) @ rt.T
    return h + b @ rt.T


def compare_logits(ours, our_mask, ref, ref_mask, atol=ATOL):
    for b, (rc, ro) in enumerate(zip(real_positions(our_mask), real_positions(ref_mask))):
        torch.testing.assert_close(ours[b, rc], ref[b, ro], atol=atol, rtol=0)


def check(lm, component, kind, selector, side, subspace=None, atol=ATOL):
    family, cfg = lm.arch.family.name, lm.hf.config
    if kind == "resample" and selector in ("all", slice(1, None, 2)):
        selector = "f2+l2"  # resample takes the same slot of another row: equal counts per row
    site = site_for(lm, component, selector, subspace)
    width = len(subspace) if subspace and kind not in REFT else lm.arch.width(component)
    op = op_for(kind, width)
    g = rg.Graph()
    g.add(site, op, name="n")
    sources = {"source": SOURCE} if kind == "patch" else None
    out = g.run(lm, BASE, sources=sources, padding_side=side)
    base_inputs = encode(lm.tokenizer, BASE, side)
    src_inputs = encode(lm.tokenizer, SOURCE, side)
    src_tensor = capture(lm.hf, family, component, 1, src_inputs, cfg) if kind == "patch" else None
    if kind == "collect":
        clean = capture(lm.hf, family, component, 1, base_inputs, cfg)
        for b, real in enumerate(real_positions(base_inputs["attention_mask"])):
            rel = positions_of(selector, len(real))
            want = clean[b, [real[r] for r in rel]]
            if site.head is not None:
                want = want[:, list(site.head)]
            if subspace:
                want = want[..., list(subspace)]
            torch.testing.assert_close(out["n"][b, :len(rel)], want, atol=atol, rtol=0)
            assert out.valid["n"][b].sum() == len(rel)
        ref = lm.hf(**base_inputs).logits
        compare_logits(out.logits, out.attention_mask[out.rows["base"]], ref, base_inputs["attention_mask"], atol)
        return True
    edit = oracle_edit(kind, op, site, base_inputs["attention_mask"], src_tensor, src_inputs["attention_mask"])
    weights = torch.randn(out.logits.shape[-1], generator=torch.Generator().manual_seed(1))
    base_mask = out.attention_mask[out.rows["base"]]

    def loss(logits, mask):
        return sum((logits[b, r] * weights).sum() for b, r in enumerate(real_positions(mask)))

    params = list(g.parameters())
    ours_grad = torch.autograd.grad(loss(out.logits, base_mask), params) if params else ()
    ref = run_with(lm.hf, family, component, 1, base_inputs, edit, cfg)
    compare_logits(out.logits, base_mask, ref, base_inputs["attention_mask"], atol)
    if params:
        ref_grad = torch.autograd.grad(loss(ref, base_inputs["attention_mask"]), params)
        for a, b in zip(ours_grad, ref_grad):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5 if atol == ATOL else 2e-2)
    # whether the edit changed anything (q at the first token, e.g., cannot)
    return not torch.allclose(ref, lm.hf(**base_inputs).logits, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_and_op(lm, component, kind, side):
    if not present(lm, component):
        return
    changed = [check(lm, component, kind, selector, side) for selector in SELECTORS]
    assert any(changed), "no selector changed the output: the oracle compared no-ops"


@pytest.mark.parametrize("kind", ["patch", "add", "mean", "collect"])
@pytest.mark.parametrize("component", ["resid_post", "mlp_act", "head_out", "k"])
def test_subspace_dims(lm, component, kind):
    assert check(lm, component, kind, "f2+l2", "left", subspace=(0, 3, 5))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", REFT)
@pytest.mark.parametrize("component", COMPONENTS)
def test_reft_ops(lm, component, kind, side):
    if not present(lm, component):
        return
    changed = [check(lm, component, kind, selector, side) for selector in ("last", "f2+l2", [0, -2])]
    assert any(changed)


@pytest.mark.parametrize("kind", REFT)
def test_reft_subspace_of_rank(lm, kind):
    """dims (0, 2) of a rank-4 op: only those rows of R, W and b act (and get gradients)."""
    assert check(lm, "resid_post", kind, "f2+l2", "left", subspace=(0, 2))
    assert check(lm, "head_out", kind, "last", "right", subspace=(3,))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["patch", "add", "collect", "LoReFT"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_more_architectures(more, component, kind, side):
    if not present(more, component):
        return
    changed = [check(more, component, kind, selector, side) for selector in ("last", [0, -2])]
    assert any(changed)
