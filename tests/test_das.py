"""Rotate (DAS, Boundless DAS) against plain hooks; saving; errors; training and IIA."""

import pytest
import torch

import reftgraph as rg
from oracle import capture, encode, positions_of, real_positions, run_with
from reftgraph.das import iia, predict, temperature_at, train_das, types
from reftgraph.core.ops import Rotate
from reftgraph.patching import Counterfactual

BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]  # same lengths as BASE, row by row
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return rg.models.tiny(request.param)


def rotate_math(op, h, s, dims):
    """``h + R^T M (R s - R h)`` with the full basis and an explicit mask vector."""
    rt = torch.linalg.qr(op.rotate)[0]
    rt = rt * torch.sign(torch.diagonal(torch.linalg.qr(op.rotate)[1]))  # QR with R's diagonal positive
    m = torch.zeros(op.rank)
    dims = list(range(op.rank if op.boundless else op.k)) if dims is None else list(dims)
    i = torch.tensor(dims, dtype=torch.float32)
    m[dims] = torch.sigmoid((op.boundary - i - 0.5) / op.temperature) if op.boundless else 1.0
    return h + ((s @ rt - h @ rt) * m) @ rt.T


def oracle_edit(op, site, src, base_mask, src_mask):
    base_real, src_real = real_positions(base_mask), real_positions(src_mask)
    heads = list(site.head) if site.head is not None else None

    def edit(t):
        out = t.clone()
        for b in range(t.shape[0]):
            for r_base, r_src in zip(positions_of(site.positions, len(base_real[b])),
                                     positions_of(site.positions, len(src_real[b]))):
                p, q = base_real[b][r_base], src_real[b][r_src]
                if heads is None:
                    out[b, p] = rotate_math(op, t[b, p], src[b, q], site.subspace)
                else:
                    out[b, p, heads] = rotate_math(op, t[b, p, heads], src[b, q, heads], site.subspace)
        return out

    return edit


VARIANTS = {
    "k2": dict(k=2),
    "subspace": dict(k=1, rank=6),
    "boundless": dict(k=3, rank=8, boundless=True, temperature=0.7),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("component", ["resid_post", "head_out"])
def test_rotate_matches_oracle(lm, component, variant, side):
    family, cfg = lm.arch.family.name, lm.hf.config
    width = lm.arch.width(component)
    head = (1, 0) if component == "head_out" else None
    subspace = (1, 4) if variant == "subspace" else None
    site = rg.Site(component, layer=1, positions="f2+l1", head=head, subspace=subspace)
    op = Rotate(width=width, seed=3, **VARIANTS[variant])
    g = rg.Graph()
    g.add(site, op, name="das")
    out = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side, grad=True)

    base_in, src_in = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    src = capture(lm.hf, family, component, 1, src_in, cfg)
    ref = run_with(lm.hf, family, component, 1, base_in,
                   oracle_edit(op, site, src, base_in["attention_mask"], src_in["attention_mask"]), cfg)
    clean = lm.hf(**base_in).logits
    ours_mask = out.attention_mask[out.rows["base"]]
    w = torch.randn(out.logits.shape[-1], generator=torch.Generator().manual_seed(1))

    def loss(logits, mask):
        return sum((logits[b, r] * w).sum() for b, r in enumerate(real_positions(mask)))

    params = list(op.parameters())
    ours_grad = torch.autograd.grad(loss(out.logits, ours_mask), params)
    ref_grad = torch.autograd.grad(loss(ref, base_in["attention_mask"]), params)
    for b, (ro, rr) in enumerate(zip(real_positions(ours_mask), real_positions(base_in["attention_mask"]))):
        torch.testing.assert_close(out.logits[b, ro], ref[b, rr], atol=ATOL, rtol=0)
    assert not torch.allclose(ref, clean, atol=1e-4), "the oracle compared a no-op"
    for a, b in zip(ours_grad, ref_grad):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_full_interchange_is_a_patch(lm):
    """k = width swaps the whole vector: the same logits as Patch."""
    width = lm.arch.d_model
    site = rg.Site("resid_post", layer=0, positions="last")
    outs = []
    for op in (Rotate(width=width, k=width, seed=0), rg.Patch("source")):
        g = rg.Graph()
        g.add(site, op, name="n")
        outs.append(g.run(lm, BASE, sources={"source": SOURCE}).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_basis_is_orthonormal_and_prefix_consistent():
    op = Rotate(width=16, k=3, rank=10, seed=0)
    with torch.no_grad():
        op.rotate.add_(0.3 * torch.randn(16, 10))  # no longer orthonormal as stored
    r = op.R()
    torch.testing.assert_close(r @ r.T, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(op.R((2, 5)), r[[2, 5]], atol=1e-5, rtol=0)


def test_save_load_round_trip(lm, tmp_path):
    width = lm.arch.d_model
    src_site = rg.Site("resid_pre", layer=1, positions="last")
    op = Rotate(width=width, k=3, rank=5, boundless=True, temperature=0.3, seed=1, site=src_site)
    with torch.no_grad():
        op.boundary.fill_(2.2)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), op, name="das")
    g.save(tmp_path / "g", model=lm)
    g2 = rg.load_graph(tmp_path / "g", model=lm)
    op2 = g2["das"].op
    assert op2.config() == op.config() and float(op2.temperature) == pytest.approx(0.3)
    a = g.run(lm, BASE, sources={"source": SOURCE}).logits
    b = g2.run(lm, BASE, sources={"source": SOURCE}).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_errors_name_node_and_range(lm):
    width = lm.arch.d_model
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last", subspace=(0, 7)), Rotate(width=width, rank=4), name="x")
    with pytest.raises(rg.SiteError, match=r"node 'x' .*subspace dim 7 .*valid dims 0\.\.3"):
        g.run(lm, BASE, sources={"source": SOURCE})
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), Rotate(width=width, source="s1"), name="y")
    with pytest.raises(rg.SiteError, match="stream 's1' was not given"):
        g.run(lm, BASE)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.4"):
        Rotate(width=width, k=5, rank=4)
    with pytest.raises(ValueError, match="source="):
        Rotate(width=4)(torch.zeros(1, 1, 4))


def test_temperature_schedule():
    assert temperature_at(0, 10, (50.0, 0.1)) == pytest.approx(50.0)
    assert temperature_at(9, 10, (50.0, 0.1)) == pytest.approx(0.1)
    assert temperature_at(1, 10, (50.0, 0.1)) < 50.0


def copy_task(lm, n, seed):
    """The counterfactual answer is the source's own (clean) next token: the model must
    carry the source's final state through the rotated dims."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnop"
    prompts = ["".join(letters[i] for i in torch.randint(0, 16, (4,), generator=g)) for _ in range(6 * n)]
    clean = rg.Graph().run(lm, prompts).next_token_logits.argmax(-1)
    answers = [lm.tokenizer.decode([int(t)]) for t in clean]
    # keep sources whose answer is a printable byte (one token again when encoded)
    keep = [i for i, a in enumerate(answers) if len(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) == 1]
    source, answers = [prompts[i] for i in keep[:n]], [answers[i] for i in keep[:n]]
    base = [p for i, p in enumerate(prompts) if i not in keep][:n]
    meta = [{"type": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    return Counterfactual(base, source, correct=answers, meta=meta)


@pytest.mark.parametrize("boundless", [False, True])
def test_training_raises_iia(boundless):
    """DAS at the last layer learns to carry the source's prediction: IIA rises from under
    0.2 to at least 0.75 (0.85 and 0.81 when written; fails if gradients or the schedule break)."""
    lm = rg.models.tiny("llama")
    data = copy_task(lm, 48, seed=0)
    op = Rotate(width=32, k=16, boundless=boundless, seed=0)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), op, name="das")
    before = iia(g, lm, data)
    history = train_das(g, lm, data, epochs=30, batch_size=16, lr=2e-2, temperature=(5.0, 0.05), progress=False)
    after = iia(g, lm, data)
    assert list(after["type"]) == ["even", "odd", "all"] and after["n"].tolist() == [24, 24, 48]
    assert before["iia"].iloc[-1] < 0.2 and after["iia"].iloc[-1] >= 0.75, (before, after)
    assert history["loss"].tail(3).mean() < history["loss"].head(3).mean()  # near-flat logits: small drop
    if boundless:
        assert history["temperature"].iloc[0] == pytest.approx(5.0)
        assert float(op.temperature) == pytest.approx(0.05)


def test_iia_counts_hits_per_type():
    lm = rg.models.tiny("llama")
    data = copy_task(lm, 6, seed=1)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), Rotate(width=32, k=32), name="full")
    # a full interchange at the last layer reproduces the source's next token: IIA 1
    assert iia(g, lm, data)["iia"].tolist() == [1.0, 1.0, 1.0]
    preds = predict(g, lm, data)
    target, _ = data.answer_ids(lm)
    assert torch.equal(preds, target) and types(data)[:2] == ["even", "odd"]
