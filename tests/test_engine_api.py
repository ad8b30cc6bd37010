"""The engine's staged API: an immutable plan, ``plan.bind(batch)``, ``Batch`` constructors,
one forward that always gives back ``Outputs``, ``Skip`` as a value, executors chosen once
(here or remote, the same results), and the older calls still working with one warning."""

import dataclasses
import sys
import warnings

import pytest
import torch

import reftgraph as rg
from reftgraph.engine import (Batch, BoundPlan, Job, Outputs, PrefixCache, Skip, compile_graph, executor, forward,
                              forwards, tokenize, trace)
from reftgraph.errors import RemoteError, SiteError

PROMPTS = ["the cat sat", "a dog", "one two three four"]


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def graph():
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(torch.linspace(-1, 1, 32)), name="add")
    g.add(rg.Site("resid_pre", layer=1, positions="f1+l1"), rg.Patch("source"), name="patch")
    g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
    return g


def test_a_plan_is_immutable_and_binds_to_a_batch(lm):
    plan = compile_graph(graph(), lm.arch)
    assert isinstance(plan.steps, tuple) and isinstance(plan.hooks, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps[0].hook = None
    _, batch = tokenize(lm, {"base": PROMPTS, "source": PROMPTS[::-1]})
    bound = plan.bind(batch)
    assert isinstance(bound, BoundPlan) and bound.plan is plan and bound.batch is batch
    assert len(bound.steps) == len(plan.steps)
    assert plan.bind(batch).steps[0] is bound.steps[0], "bindings are kept per batch layout"


def test_binding_errors_come_before_any_forward(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=0, positions=[5]), rg.Collect(), name="c")
    plan = compile_graph(g, lm.arch)
    inputs, batch = tokenize(lm, {"base": ["ab"]})
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(SiteError, match="node 'c'.*beyond the prompt"):
            executor(lm).forward(plan.bind(batch), inputs)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_constructors_agree_with_tokenize(lm, side):
    inputs, batch = tokenize(lm, {"base": PROMPTS}, side)
    mine = Batch.from_mask(inputs["attention_mask"])
    assert mine.rows == batch.rows and mine.seq_len == batch.seq_len
    assert torch.equal(mine.start, batch.start) and torch.equal(mine.length, batch.length)
    single = Batch.single(batch.length, batch.seq_len, batch.start)
    assert torch.equal(single.start, batch.start) and torch.equal(single.length, batch.length)
    full = Batch.full(3, 4)
    assert full.length.tolist() == [4, 4, 4] and full.start.tolist() == [0, 0, 0] and full.seq_len == 4
    with pytest.raises(ValueError, match="seq_len 2 cannot hold"):
        Batch.single([3], 2)


def test_one_forward_one_kind_of_result(lm):
    plan = compile_graph(graph(), lm.arch)
    inputs, batch = tokenize(lm, {"base": PROMPTS, "source": PROMPTS[::-1]})
    bound = plan.bind(batch)
    logits = trace(lm, bound, inputs)
    hidden = trace(lm, bound, inputs, output="hidden")
    stopped = trace(lm, bound, inputs, output=None)
    assert all(isinstance(o, Outputs) for o in (logits, hidden, stopped))
    assert logits.value.shape == (6, batch.seq_len, 259) and hidden.value.shape == (6, batch.seq_len, 32)
    assert stopped.value is None
    for out in (hidden, stopped):   # the same edits, the same collected values
        torch.testing.assert_close(out.collected["m"][0], logits.collected["m"][0], atol=0, rtol=0)
    head = lm.hf.get_output_embeddings()
    torch.testing.assert_close(head(hidden.value[:, -1]), logits.value[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output must be one of"):
        trace(lm, bound, inputs, output="probs")


def test_output_none_stops_after_the_plans_last_hook(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0), rg.Collect(), name="r")
    inputs, batch = tokenize(lm, {"base": PROMPTS})
    ran = []
    handle = lm.hf.model.layers[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        out = executor(lm).forward(compile_graph(g, lm.arch).bind(batch), inputs, output=None)
    finally:
        handle.remove()
    assert out.value is None and out.collected["r"][0].shape[0] == 3 and ran == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_skip_is_a_value_and_changes_nothing(lm, side):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="r")
    plan = compile_graph(g, lm.arch)
    inputs, batch = tokenize(lm, {"base": PROMPTS}, side)
    skip = PrefixCache(lm).skip(plan, inputs)
    assert isinstance(skip, Skip) and skip.layer == 1
    grads = []
    for s in (None, skip):
        out = executor(lm).forward(plan.bind(batch), inputs, output="hidden", skip=s)
        out.value.square().sum().backward()
        grads.append([p.grad.clone() for p in g.parameters()])
        g.ops.zero_grad()
        if s is None:
            plain = out.value.detach()
    torch.testing.assert_close(out.value.detach(), plain, atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    g0 = rg.Graph()
    g0.add(rg.Site("resid_pre", layer=0), rg.Collect(), name="c")
    assert PrefixCache(lm).skip(compile_graph(g0, lm.arch), inputs) is None, "nothing to skip below layer 0"


def test_executors_give_the_same_results_here_and_remote(lm):
    plan = compile_graph(graph(), lm.arch)
    jobs = []
    for prompts in (PROMPTS, PROMPTS[:2]):
        inputs, batch = tokenize(lm, {"base": prompts, "source": prompts[::-1]})
        jobs.append(Job(plan.bind(batch), inputs, lambda logits, collected: (logits[:, -1], collected["m"][0])))
    here, there = executor(lm).map(jobs), executor(lm, remote="local").map(jobs)
    for (a, b), (c, d) in zip(here, there):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, d, atol=1e-6, rtol=0)
    done = []
    executor(lm).map(jobs, done=done.append)
    executor(lm, remote="local").map(jobs, done=done.append)
    assert done == [1, 1, 2]
    one = executor(lm, remote="local").forward(jobs[0].bound, jobs[0].inputs)
    torch.testing.assert_close(one.value[:, -1], here[0][0], atol=1e-6, rtol=0)
    with pytest.raises(RemoteError, match="cannot skip"):
        executor(lm, remote="local").forward(jobs[0].bound, jobs[0].inputs, skip=Skip(1, torch.zeros(1)))


def test_the_older_calls_still_work_and_warn_once(lm, monkeypatch):
    monkeypatch.setattr(sys.modules["reftgraph.engine.run"], "_WARNED", set())
    plan = compile_graph(graph(), lm.arch)
    inputs, batch = tokenize(lm, {"base": PROMPTS, "source": PROMPTS[::-1]})
    new = executor(lm).forward(plan.bind(batch), inputs, output="hidden")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            value, collected = forward(plan, lm, inputs, batch, hidden=True)
            torch.testing.assert_close(value, new.value, atol=0, rtol=0)
        stopped, _ = forward(plan, lm, inputs, batch, stop=True)
        got = forwards(lm, [(plan, inputs, batch, lambda logits, c: logits.shape)] * 2, remote="local")
    assert stopped is None and got == [torch.Size([6, batch.seq_len, 259])] * 2
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 2 and "reftgraph.engine.forward" in messages[0] and "forwards" in messages[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_at_the_last_token_alone_are_the_full_runs(lm, side):
    """``logits="last"`` runs the head on each row's last prompt token only: the same next-token
    logits and the same gradients as the full run, ragged rows on either padding side."""
    add = rg.Add(torch.zeros(32), trainable=True)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="all"), add, name="add")
    full = g.run(lm, PROMPTS, padding_side=side)
    last = g.run(lm, PROMPTS, padding_side=side, logits="last")
    assert last.logits.shape == (3, 1, 259)
    torch.testing.assert_close(last.next_token_logits, full.next_token_logits, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(out.next_token_logits[:, 7].sum(), add.vector)[0] for out in (full, last)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    reads = rg.Graph()
    reads.add(rg.Site("logits", positions="all"), rg.Collect(), name="l")
    assert reads.run(lm, PROMPTS, logits="last").logits.shape[1] > 1   # a graph on the logits keeps them all
    with pytest.raises(rg.DataError, match="logits must be 'all' or 'last'"):
        g.run(lm, PROMPTS, logits="first")
