"""Per-row subspaces (pyreft's per-example subspaces): in one batch, each row edits along its
own dims of a learned basis. Against plain hooks that loop over rows, outputs and
gradients, both padding sides; then generation, training data and bad input."""

import pytest
import torch

import reftgraph as rg
from oracle import capture, encode, positions_of, real_positions, run_with
from test_oracle import BASE, SOURCE, reft_math, site_for

ROW_DIMS = [[0, 2], [1, 3]]   # row 0 uses dims 0 and 2 of the basis, row 1 dims 1 and 3
KINDS = ("LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT", "Rotate")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return rg.models.tiny(request.param)


def make_op(kind, width):
    if kind == "Rotate":
        return rg.Rotate(width=width, k=4, seed=0)
    op = getattr(rg, kind)(width=width, rank=4, act="tanh" if "Di" in kind else "identity", seed=0)
    with torch.no_grad():
        op.bias.normal_(generator=torch.Generator().manual_seed(1))
    return op


def edited(op, h, dims, src):
    """One position's new value with ``dims`` of the op's basis, written out."""
    if isinstance(op, rg.Rotate):
        rt = op.Rt()[:, dims]
        return h + ((src - h) @ rt) @ rt.T
    return reft_math(op, h, dims)


def oracle_edit(op, site, base_mask, src_tensor, src_mask, row_dims):
    base_real, src_real = real_positions(base_mask), real_positions(src_mask)
    heads = list(site.head) if site.head is not None else None

    def edit(t):
        out = t.clone()
        for b in range(t.shape[0]):
            rel = positions_of(site.positions, len(base_real[b]))
            for j, r in enumerate(rel):
                p, q = base_real[b][r], src_real[b][positions_of(site.positions, len(src_real[b]))[j]]
                cur, src = t[b, p], src_tensor[b, q]
                new = cur.clone()
                if heads is None:
                    new = edited(op, cur, row_dims[b], src)
                else:
                    new[heads] = edited(op, cur[heads], row_dims[b], src[heads])
                out[b, p] = new
        return out

    return edit


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("component", ["resid_post", "mlp_act", "head_out", "v"])
def test_rows_with_different_dims_in_one_batch(lm, component, kind, side):
    family, cfg = lm.arch.family.name, lm.hf.config
    site = site_for(lm, component, "f2+l2", None)
    op = make_op(kind, lm.arch.width(component))
    g = rg.Graph()
    g.add(site, op, name="n")
    sources = {"source": SOURCE} if kind == "Rotate" else None
    out = g.run(lm, BASE, sources=sources, padding_side=side, subspaces=ROW_DIMS)
    base_inputs, src_inputs = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    src_tensor = capture(lm.hf, family, component, 1, src_inputs, cfg)
    edit = oracle_edit(op, site, base_inputs["attention_mask"], src_tensor, src_inputs["attention_mask"], ROW_DIMS)
    ref = run_with(lm.hf, family, component, 1, base_inputs, edit, cfg)
    weights = torch.randn(out.logits.shape[-1], generator=torch.Generator().manual_seed(2))
    ours_mask, ref_mask = out.attention_mask[out.rows["base"]], base_inputs["attention_mask"]

    def loss(logits, mask):
        return sum((logits[b, r] * weights).sum() for b, r in enumerate(real_positions(mask)))

    params = [p for p in g.parameters() if p.requires_grad]
    ours_grad = torch.autograd.grad(loss(out.logits, ours_mask), params)
    ref_grad = torch.autograd.grad(loss(ref, ref_mask), params)
    for b, (ro, rr) in enumerate(zip(real_positions(ours_mask), real_positions(ref_mask))):
        torch.testing.assert_close(out.logits[b, ro], ref[b, rr], atol=1e-5, rtol=0)
    for a, b in zip(ours_grad, ref_grad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # each row's edit differs from the other row's dims (the choice matters)
    swapped = g.run(lm, BASE, sources=sources, padding_side=side, subspaces=ROW_DIMS[::-1])
    assert not torch.allclose(swapped.logits, out.logits, atol=1e-4)


def test_a_per_call_choice_equals_the_static_subspace():
    lm = rg.models.tiny("llama")
    op = make_op("LoReFT", 32)
    g, static = rg.Graph(), rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), op, name="r")
    static.add(rg.Site("resid_post", layer=1, positions="last", subspace=(1, 3)), op, name="r")
    torch.testing.assert_close(g.run(lm, BASE, subspaces=[1, 3]).logits, static.run(lm, BASE).logits,
                               atol=1e-6, rtol=0)
    # per node; an entry of None is every dim (the graph as it is)
    full = g.run(lm, BASE).logits
    torch.testing.assert_close(g.run(lm, BASE, subspaces={"r": [None, None]}).logits, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(g.run(lm, BASE, subspaces=[[0, 1, 2, 3], None]).logits, full, atol=1e-6, rtol=0)


def test_generation_with_a_subspace_per_prompt():
    lm = rg.models.tiny("llama")
    op = rg.LoBiReFT(width=32, rank=4)
    with torch.no_grad():
        op.bias.copy_(torch.tensor([40.0, -40.0, 30.0, -30.0]))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="all"), op, name="r")
    both = g.generate(lm, ["ab", "ab"], max_new_tokens=4, subspaces=[[0, 1], [2, 3]]).ids
    one = g.generate(lm, ["ab"], max_new_tokens=4, subspaces=[0, 1]).ids
    other = g.generate(lm, ["ab"], max_new_tokens=4, subspaces=[2, 3]).ids
    assert torch.equal(both[0], one[0]) and torch.equal(both[1], other[0]) and not torch.equal(one, other)


def test_training_rows_train_only_their_dims():
    """A joint run over two tasks, each row tagged with its dims: a dim no row uses gets no
    gradient (its weights stay at their initial values)."""
    lm = rg.models.tiny("llama")
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=4)
    before = {k: v.clone() for k, v in g.ops.state_dict().items()}
    data = rg.data.PromptResponse([("ab", "cd"), ("abc", "dd"), ("b", "cc")], subspaces=[[0], [1], {"L1": [0]}])
    rg.train(g, lm, data, epochs=3, batch_size=3, lr=0.05, warmup=0.0, progress=False)
    after = g.ops.state_dict()
    bias = [k for k in after if k.endswith("bias")][0]
    assert not torch.equal(after[bias][:2], before[bias][:2])     # dims 0 and 1 trained
    assert torch.equal(after[bias][2:], before[bias][2:])         # dims 2 and 3: no row uses them


@pytest.mark.parametrize("subspaces, message", [
    ([[0, 1]], r"dims for every row or one entry per row \(2 rows\)"),
    ([[0, 9], [1]], r"row 0 asks for dim 9; the node's dims are \[0, 1, 2, 3\]"),
    ({"nope": [0]}, r"subspaces name nodes \['nope'\] that are not in the graph"),
    ([{"nope": [0]}, None], r"subspaces name nodes \['nope'\] that are not in the graph"),
])
def test_bad_subspaces_are_refused_before_any_forward(subspaces, message):
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=4), name="r")
    with pytest.raises(rg.SiteError, match=message):
        g.run(lm, BASE, subspaces=subspaces)


def test_per_row_subspaces_are_for_learned_bases():
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Add(torch.ones(32)), name="a")
    with pytest.raises(rg.SiteError, match="node 'a'.*Add takes no per-row subspaces"):
        g.run(lm, BASE, subspaces={"a": [0]})
    rotate = rg.Graph()
    rotate.add(rg.Site("resid_post", layer=1, positions="last"), rg.Rotate(width=32, k=2), name="d")
    with pytest.raises(rg.SiteError, match=r"row 0 asks for dim 5; the node's dims are \[0, 1\]"):
        rotate.run(lm, BASE, sources={"source": SOURCE}, subspaces=[5])
    with pytest.raises(ValueError, match="subspaces needs one entry per row"):
        rg.data.PromptResponse([("a", "b")], subspaces=[[0], [1]])
