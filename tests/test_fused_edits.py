"""Fused edits: steps that share a hook, a view and their slots are gathered once, edited in
plan order and written back once (reftgraph.engine.apply). They must give what the steps
give one at a time (each gathering and writing back on its own): outputs, collected
values and gradients, for several nodes at one hook, both padding sides; and what plain
PyTorch hooks give for the same edits in sequence."""

import importlib

import pytest
import torch

import reftgraph as rg
from oracle import encode, real_positions

apply_module = importlib.import_module("reftgraph.engine.apply")

BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]   # same lengths as BASE, row by row
SIDES = ("left", "right")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return rg.models.tiny(request.param)


def vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def outcome(graph, lm, side, fuse, subspaces=None):
    """Logits, collected values and every gradient of a run, fused or one step at a time."""
    old, apply_module.FUSE = apply_module.FUSE, fuse
    try:
        for p in graph.parameters():
            p.grad = None
        sources = {"source": SOURCE} if "source" in graph.streams else None
        out = graph.run(lm, BASE, sources=sources, padding_side=side, grad=True, subspaces=subspaces)
        loss = out.logits.pow(2).mean() + sum(v.pow(2).mean() for v in out.collected.values())
        loss.backward()
        grads = {name: p.grad.clone() for name, p in graph.ops.named_parameters() if p.grad is not None}
        return out, grads
    finally:
        apply_module.FUSE = old


def assert_same(graph, lm, side, subspaces=None, atol=1e-6):
    fused, fused_grads = outcome(graph, lm, side, True, subspaces)
    alone, alone_grads = outcome(graph, lm, side, False, subspaces)
    torch.testing.assert_close(fused.logits, alone.logits, atol=atol, rtol=0)
    assert set(fused.collected) == set(alone.collected)
    for name in alone.collected:
        torch.testing.assert_close(fused[name], alone[name], atol=atol, rtol=0)
        assert torch.equal(fused.valid[name], alone.valid[name])
    assert set(fused_grads) == set(alone_grads) and alone_grads
    for name in alone_grads:
        torch.testing.assert_close(fused_grads[name], alone_grads[name], atol=atol, rtol=1e-5)
    return fused


def runs_per_hook(graph, lm):
    """How many gathered runs each hook of the graph's plan gets (fused)."""
    counted = []
    inner = apply_module._run

    def counting(plan, bound, steps, hook, *args):
        counted.append((hook, len(steps)))
        return inner(plan, bound, steps, hook, *args)

    apply_module._run = counting
    try:
        graph.run(lm, BASE, sources={"source": SOURCE} if "source" in graph.streams else None)
    finally:
        apply_module._run = inner
    return counted


POSITIONS = ("last", "all", "f2+l2", (0, -1), slice(1, None, 2))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("component", ["resid_post", "mlp_out", "resid_pre", "mlp_act"])
def test_a_chain_at_one_hook(lm, component, positions, side):
    """Add + Collect + Add + Patch + Collect + Set on dims + LoReFT + Collect at one site."""
    w = lm.arch.width(component, 1)
    g = rg.Graph()
    site = rg.Site(component, layer=1, positions=positions)
    g.add(site, rg.Add(vec(w, 0), trainable=True), name="a1")
    g.add(site, rg.Collect(), name="c1")
    g.add(site, rg.Add(vec(w, 1), scale=2.0, trainable=True), name="a2")
    g.add(site, rg.Patch("source"), name="p")
    g.add(site, rg.Collect(), name="c2")
    g.add(site.replace(subspace=[0, 3]), rg.Set(vec(2, 2), trainable=True), name="s")
    g.add(site, rg.LoReFT(width=w, rank=4, seed=1), name="lo")
    g.add(site, rg.Collect(), name="c3")
    assert_same(g, lm, side)
    assert [n for _, n in runs_per_hook(g, lm)] == [8]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("positions", ["last", "all", (0, -1)])
@pytest.mark.parametrize("component", ["head_out", "q", "k", "v"])
def test_heads(lm, component, positions, side):
    """Edits of different heads (and subspaces of one head) on one gathered slice."""
    d = lm.arch.width(component, 1)
    g = rg.Graph()
    site = rg.Site(component, layer=1, positions=positions)
    g.add(site.replace(head=(1, 0)), rg.Add(vec(d, 0), trainable=True), name="a")
    g.add(site, rg.Collect(), name="all_heads")
    g.add(site.replace(head=0), rg.Patch("source"), name="p")
    g.add(site.replace(head=1, subspace=[1, 2]), rg.Set(vec(2, 1), trainable=True), name="s")
    g.add(site.replace(head=(0, 1)), rg.Collect(), name="two")
    assert_same(g, lm, side)


@pytest.mark.parametrize("side", SIDES)
def test_per_row_subspaces(lm, side):
    w = lm.arch.width("resid_post", 1)
    g = rg.Graph()
    site = rg.Site("resid_post", layer=1, positions="f1+l1")
    g.add(site, rg.LoReFT(width=w, rank=4, seed=0), name="r1")
    g.add(site, rg.Collect(), name="c")
    g.add(site, rg.LoReFT(width=w, rank=4, seed=1), name="r2")
    assert_same(g, lm, side, subspaces=[[0, 2], [1, 3]])


@pytest.mark.parametrize("side", SIDES)
def test_mixed_positions_and_views(lm, side):
    """Runs break where the slots or the view change; a patch reading its own stream at the
    same hook reads the value after the edits before it."""
    w = lm.arch.width("resid_post", 1)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Add(vec(w, 0), trainable=True), name="a")
    g.add(rg.Site("resid_post", layer=1, positions="all"), rg.Add(vec(w, 1), trainable=True), name="b")
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="c")
    g.add(rg.Site("resid_post", layer=1, positions=[0]),
          rg.Patch(source="base", site=rg.Site("resid_post", layer=1, positions="last")), name="self")
    g.add(rg.Site("resid_post", layer=1, positions="all"), rg.Collect(), name="d")
    g.add(rg.Site("attn_out", layer=1, positions="last"), rg.Add(vec(w, 2), trainable=True), name="e")
    g.add(rg.Site("attn_out", layer=1, positions="last"), rg.Collect(), name="f")
    assert_same(g, lm, side)
    counts = [n for _, n in runs_per_hook(g, lm)]
    assert counts == [2, 1, 1, 1, 1, 1]


def test_fused_nodes_against_plain_hooks(lm):
    """Two Adds accumulate, a Patch after them overwrites, and collects in between see the
    value at their turn: checked against the same edits written as one plain hook."""
    side = "left"
    w = lm.arch.width("resid_post", 0)
    v1, v2 = vec(w, 0), vec(w, 1)
    g = rg.Graph()
    site = rg.Site("resid_post", layer=0, positions="f1+l1")
    g.add(site, rg.Add(v1), name="a1")
    g.add(site, rg.Collect(), name="c1")
    g.add(site, rg.Add(v2, scale=0.5), name="a2")
    g.add(site, rg.Collect(), name="c2")
    g.add(site.replace(subspace=[2, 5]), rg.Patch("source"), name="p")
    g.add(site, rg.Collect(), name="c3")
    out = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side)

    base, src = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    block = lm.arch.envoy(lm.hf, lm.arch.hook("resid_post", 0))
    seen = {}
    handle = block.register_forward_hook(lambda m, a, o: seen.update(src=(o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        lm.hf(**src)
    handle.remove()
    base_real, src_real = real_positions(base["attention_mask"]), real_positions(src["attention_mask"])
    expect = {"c1": [], "c2": [], "c3": []}

    def edit(t):
        t = t.clone()
        for b in range(t.shape[0]):
            n, m = len(base_real[b]), len(src_real[b])
            rows = {"c1": [], "c2": [], "c3": []}
            for j, (r, q) in enumerate(zip([0, n - 1], [0, m - 1])):
                p = base_real[b][r]
                x = t[b, p] + v1
                rows["c1"].append(x)
                x = x + 0.5 * v2
                rows["c2"].append(x)
                x = x.clone()
                x[[2, 5]] = seen["src"][b, src_real[b][q]][[2, 5]]
                rows["c3"].append(x)
                t[b, p] = x
            for k in rows:
                expect[k].append(torch.stack(rows[k]))
        return t

    handle = block.register_forward_hook(lambda m, a, o: (edit(o[0]),) + tuple(o[1:]) if isinstance(o, tuple)
                                         else edit(o))
    try:
        with torch.no_grad():
            logits = lm.hf(**base).logits
    finally:
        handle.remove()
    for name, rows in expect.items():
        torch.testing.assert_close(out[name], torch.stack(rows), atol=1e-5, rtol=1e-5)
    for b, real in enumerate(base_real):
        torch.testing.assert_close(out.logits[b, real], logits[b, real], atol=1e-5, rtol=1e-5)
    assert [n for _, n in runs_per_hook(g, lm)] == [6]


@pytest.mark.parametrize("side", SIDES)
def test_half_precision(side):
    """bfloat16: the same values fused or not (each op in float32 on its slice, rounded back)."""
    lm = rg.models.tiny("llama", dtype=torch.bfloat16)
    w = lm.arch.width("resid_post", 1)
    g = rg.Graph()
    site = rg.Site("resid_post", layer=1, positions="all")
    g.add(site, rg.Add(vec(w, 0)), name="a1")
    g.add(site, rg.Collect(), name="c1")
    g.add(site, rg.LoReFT(width=w, rank=4, seed=1), name="lo")
    g.add(site, rg.Add(vec(w, 1)), name="a2")
    g.add(site, rg.Collect(), name="c2")
    outs = []
    for fuse in (True, False):
        old, apply_module.FUSE = apply_module.FUSE, fuse
        try:
            outs.append(g.run(lm, BASE, padding_side=side, grad=False))
        finally:
            apply_module.FUSE = old
    assert outs[0].logits.dtype == torch.bfloat16
    assert torch.equal(outs[0].logits, outs[1].logits)
    for name in ("c1", "c2"):
        assert torch.equal(outs[0][name], outs[1][name])


def test_generate_fused(lm):
    """Generation edits (prompt pass and each new token) fused or not: the same tokens."""
    w = lm.arch.width("resid_post", 0)
    g = rg.Graph()
    for i, positions in enumerate(["last", "all", "generated", "generated"]):
        g.add(rg.Site("resid_post", layer=0, positions=positions), rg.Add(3 * vec(w, i)), name=f"a{i}")
    ids = []
    for fuse in (True, False):
        old, apply_module.FUSE = apply_module.FUSE, fuse
        try:
            ids.append(g.generate(lm, BASE, max_new_tokens=4).ids)
        finally:
            apply_module.FUSE = old
    assert torch.equal(ids[0], ids[1])


def test_a_slice_of_the_whole_batch_is_edited_in_place_of_the_full_tensor(lm, monkeypatch):
    """Equal-length prompts, one stream, every position: the slice is the hook's own tensor (no
    gather, no scatter). The edits, collected values and gradients are those of plain hooks, and
    a collected value is a copy, not the model's tensor."""
    prompts = ["the cat sat", "one dog ran"]
    assert len(set(map(len, lm.tokenizer(prompts)["input_ids"]))) == 1
    monkeypatch.setattr(apply_module, "_gather", lambda *a: pytest.fail("the whole batch was gathered"))
    width = lm.arch.width("resid_post")
    add = rg.Add(vec(width, 1), trainable=True)
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0), rg.Collect(), name="before")
    g.add(rg.Site("resid_post", 0), add, name="add")
    g.add(rg.Site("resid_post", 0), rg.Collect(), name="after")
    out = g.run(lm, prompts, grad=True)
    inputs = encode(lm.tokenizer, prompts, "right")
    seen = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen["before"] = hidden.detach().clone()
        hidden = hidden + add.vector
        seen["after"] = hidden.detach().clone()
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    block = lm.arch.envoy(lm.hf, rg.arch.structure.Hook(0, 0, "", "output"))
    handle = block.register_forward_hook(hook)
    try:
        ref = lm.hf(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["before"], seen["before"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["after"], seen["after"], atol=1e-6, rtol=0)
    assert out["before"].data_ptr() != out["after"].data_ptr()
    ours = torch.autograd.grad(out.logits.pow(2).sum(), add.vector)[0]
    handle = block.register_forward_hook(hook)
    try:
        theirs_logits = lm.hf(**inputs).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ours, torch.autograd.grad(theirs_logits.pow(2).sum(), add.vector)[0], atol=1e-4,
                               rtol=1e-5)
