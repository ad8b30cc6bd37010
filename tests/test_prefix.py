"""Frozen-prefix caching: cached forwards and training steps equal uncached ones (values and
gradients), the blocks below the lowest edit really do not run, and the cache is rebuilt
or refused when inputs, graph or model change."""

import numpy as np
import pytest
import torch

import reftgraph as rg
from reftgraph.engine import compile_graph
from reftgraph.prefix import PrefixCache, first_layer
from reftgraph.engine.run import forward, tokenize

PROMPTS = ["a cat sat", "the dog", "x"]
SOURCES = ["one two", "three", "four five six"]


@pytest.fixture(scope="module")
def models():
    return {f: rg.models.tiny(f, **({"n_layer": 4} if f == "gpt2" else {"num_hidden_layers": 4}))
            for f in ("llama", "gpt2", "gpt_neox")}


def graph_at(width: int, layer: int) -> rg.Graph:
    """Edits at ``layer`` and above: a ConsReFT at the block input, a patch from the source
    stream, a LoReFT on the last MLP output, and a collected attention head."""
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=layer, positions="last"), rg.ConsReFT(width=width, rank=1, seed=1), name="c")
    g.add(rg.Site("resid_post", layer=layer, positions=[0]), rg.Patch(source="source"), name="p")
    g.add(rg.Site("mlp_out", layer=-1, positions="f1+l1"), rg.LoReFT(width=width, rank=2, seed=2), name="l")
    g.add(rg.Site("head_out", layer=layer + 1, head=1, positions="last"), rg.Collect(), name="h")
    return g


def step(g, lm, inputs, batch, cache=None):
    """Loss and parameter gradients of one forward + backward."""
    plan = compile_graph(g, lm.arch)
    for p in g.parameters():
        p.grad = None
    if cache is None:
        logits, collected = forward(plan, lm, inputs, batch)
    else:
        logits, collected = cache.forward(plan, inputs, batch)
    loss = logits.float().pow(2).mean() + collected["h"][0].pow(2).mean()
    loss.backward()
    return loss.detach(), logits.detach(), {k: p.grad.clone() for k, p in g.ops.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_equals_uncached(models, family, side):
    lm = models[family]
    g = graph_at(lm.arch.d_model, layer=1)
    inputs, batch = tokenize(lm, {"base": PROMPTS, "source": SOURCES}, side)
    cache = PrefixCache(lm)
    loss, logits, grads = step(g, lm, inputs, batch)
    for _ in range(2):  # a miss, then a hit
        c_loss, c_logits, c_grads = step(g, lm, inputs, batch, cache)
        torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
        assert grads.keys() == c_grads.keys()
        for k in grads:
            assert grads[k].abs().max() > 0, k
            torch.testing.assert_close(c_grads[k], grads[k], atol=1e-5, rtol=0)
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)


def test_blocks_below_the_lowest_edit_do_not_run(models):
    lm = models["llama"]
    g = graph_at(32, layer=2)
    plan = compile_graph(g, lm.arch)
    assert first_layer(plan) == 2
    inputs, batch = tokenize(lm, {"base": PROMPTS, "source": SOURCES})
    cache = PrefixCache(lm)
    cache.forward(plan, inputs, batch)  # fills the cache (runs blocks 0 and 1 once, outside the trace)
    calls = []
    # a skipped block still passes through its own hooks, but its submodules never run
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
               for i, layer in enumerate(lm.hf.model.layers)]
    try:
        cache.forward(plan, inputs, batch)
        assert calls == [2, 3]
        calls.clear()
        forward(plan, lm, inputs, batch)
        assert calls == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()


def test_rebuilt_when_inputs_or_graph_change(models):
    lm = models["llama"]
    cache = PrefixCache(lm)
    a = tokenize(lm, {"base": PROMPTS, "source": SOURCES})
    b = tokenize(lm, {"base": ["other words", "b", "c d"], "source": SOURCES})
    g2 = graph_at(32, layer=2)
    for inputs, batch in (a, b, a):
        _, logits, grads = step(g2, lm, inputs, batch)
        _, c_logits, c_grads = step(g2, lm, inputs, batch, cache)
        torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
    assert (cache.misses, cache.hits) == (2, 1)
    # same token ids, other positions (left instead of right padding): another entry
    left = tokenize(lm, {"base": PROMPTS, "source": SOURCES}, "left")
    step(g2, lm, *left, cache=cache)
    assert cache.misses == 3
    # the graph's lowest edit moves down: the stored layer-2 inputs are not reused
    g1 = graph_at(32, layer=1)
    _, logits, grads = step(g1, lm, *a)
    _, c_logits, c_grads = step(g1, lm, *a, cache=cache)
    assert cache.misses == 4
    torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=0)
    for k in grads:
        torch.testing.assert_close(c_grads[k], grads[k], atol=1e-5, rtol=0)
    # an edit at layer 0 leaves nothing to skip: an ordinary forward, nothing stored
    g0 = rg.Graph()
    g0.add(rg.Site("resid_post", layer=0, positions="last"), rg.ConsReFT(width=32, rank=1), name="z")
    n = len(cache)
    cache.forward(compile_graph(g0, lm.arch), *a)
    assert len(cache) == n


def test_bounded_and_refusals(models):
    lm = models["llama"]
    plan = compile_graph(graph_at(32, layer=1), lm.arch)
    cache = PrefixCache(lm, max_entries=1)
    first = tokenize(lm, {"base": PROMPTS, "source": SOURCES})
    cache.forward(plan, *first)
    cache.forward(plan, *tokenize(lm, {"base": ["zz", "y", "w"], "source": SOURCES}))
    cache.forward(plan, *first)
    assert len(cache) == 1 and cache.misses == 3  # the first entry was evicted
    with pytest.raises(ValueError, match="another model"):
        cache.forward(plan, *first, model=models["gpt2"])
    with pytest.raises(ValueError, match="another model"):
        cache.forward(compile_graph(graph_at(32, layer=1), models["gpt2"].arch), *first)
    with pytest.raises(ValueError, match="max_entries"):
        PrefixCache(lm, max_entries=0)
    lm.hf.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            cache.forward(plan, *tokenize(lm, {"base": ["new"] * 3, "source": SOURCES}))
    finally:
        lm.hf.eval()


# -- train(cache_prefix=True) ---------------------------------------------------------------

DATA = [("ab", "xy"), ("cde", "z"), ("f", "uvw"), ("ghij", "k"), ("lm", "no")]


@pytest.mark.parametrize("kw", [dict(shuffle=False, batch_size=2), dict(shuffle=True, batch_size=5)],
                         ids=["fixed-order", "one-batch"])
def test_train_cached_equals_uncached(models, monkeypatch, kw):
    lm = models["llama"]
    data = rg.data.PromptResponse(DATA)
    computed = []
    # patch the namespace train's PrefixCache really uses (pytest's doctest run of
    # reftgraph/prefix.py may import a second copy of the module)
    namespace = rg.PrefixCache.value.__globals__
    original = namespace["prefix_state"]
    monkeypatch.setitem(namespace, "prefix_state", lambda *a: computed.append(1) or original(*a))
    runs = {}
    for cached in (False, True):
        g = rg.reft_graph(lm, layers=[2, 3], positions="f1+l1", rank=2, op="ConsReFT", seed=0)
        h = rg.train(g, lm, data, epochs=3, lr=5e-2, progress=False, cache_prefix=cached, **kw)
        runs[cached] = (h, {k: v.detach().clone() for k, v in g.ops.named_parameters()})
    (h0, w0), (h1, w1) = runs[False], runs[True]
    np.testing.assert_allclose(h1["loss"], h0["loss"], atol=1e-5, rtol=0)
    assert h0["loss"].iloc[-1] < h0["loss"].iloc[0]
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], atol=1e-5, rtol=0)
    batches = -(-len(DATA) // kw["batch_size"])
    assert len(computed) == batches  # the prefix ran once per batch content, not once per step


def test_train_refuses_cache_with_changing_batches(models):
    lm = models["llama"]
    g = rg.reft_graph(lm, layers=[2], positions="last", rank=1, op="ConsReFT")
    with pytest.raises(ValueError, match="shuffle=False or batch_size >= 5"):
        rg.train(g, lm, rg.data.PromptResponse(DATA), batch_size=2, cache_prefix=True, progress=False)
