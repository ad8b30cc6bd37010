"""attn_pattern: each head's attention probabilities, proven per architecture and checked
against the same edit made by plain PyTorch inside eager attention (outputs and gradients,
both padding sides), with prompt-relative keys."""

import pytest
import torch

import reftgraph as rg
from oracle import encode, positions_of, real_positions
from reftgraph.arch.components.pattern import eager
from reftgraph.arch.structure import Hook

FAMILIES = ("llama", "gpt2", "gpt_neox", "gemma3_text")
BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return rg.models.tiny(request.param)


class Sharpen(rg.Op):
    """p^(1 + alpha), renormalised over the keys (alpha trainable): keeps a distribution."""

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, h, source=None, valid=None):
        powered = h.clamp_min(1e-30) ** (1 + self.alpha) * (h > 0)
        return powered / powered.sum(-1, keepdim=True).clamp_min(1e-30)


def softmax_edit(lm, layer, fn):
    """Plain PyTorch: torch's softmax wrapped while ``layer``'s attention runs; ``fn(p)`` edits
    the probabilities ``[batch, heads, query, key]``. Returns an undo."""
    attn = lm.arch.envoy(lm.hf, Hook(layer, 0, lm.arch.blocks[layer].paths.attn, "output"))
    inside = {"on": False}
    real = torch.nn.functional.softmax

    def softmax(*args, **kwargs):
        out = real(*args, **kwargs)
        return fn(out) if inside["on"] and out.dim() == 4 else out

    handles = [attn.register_forward_pre_hook(lambda m, a: inside.update(on=True)),
               attn.register_forward_hook(lambda m, a, o: inside.update(on=False))]
    torch.nn.functional.softmax = softmax

    def undo():
        torch.nn.functional.softmax = real
        for h in handles:
            h.remove()
    return undo


def alone(lm, prompt, layer=None, fn=None):
    """Logits of one prompt run alone (no padding) in eager attention, with ``fn`` at ``layer``."""
    ids = lm.tokenizer([prompt], return_tensors="pt")["input_ids"]
    with eager(lm.hf):
        undo = softmax_edit(lm, layer, fn) if fn else (lambda: None)
        try:
            return lm.hf(input_ids=ids).logits[0]
        finally:
            undo()


# -- proofs ------------------------------------------------------------------------------------

def test_the_pattern_is_proven_on_each_architecture(lm):
    assert lm.arch.table()["attn_pattern"] == "verified"
    hook = lm.arch.hook("attn_pattern", 1)
    assert hook.path == lm.arch.blocks[1].paths.attn and len(hook.inner) == 2 and "softmax" in hook.inner[-1]
    assert lm.arch.heads("attn_pattern") == lm.arch.heads("q") and lm.arch.width("attn_pattern") is None
    assert hook.stage < lm.arch.hook("head_out", 1).stage      # inside the attention, before its projection


def test_a_hand_built_arch_refuses_the_pattern():
    from reftgraph.arch.structure import Arch, Family

    arch = Arch(Family("mine", layers="model.layers", attn="self_attn"), 2, 32, 4, 4, 8, 48)
    assert "found by the proofs" in arch.refusal("attn_pattern", 0)
    assert arch.refusal("resid_post", 0) is None


def test_attention_free_blocks_refuse_it():
    lm = rg.models.tiny("mamba")
    assert "has no attention" in lm.arch.refusal("attn_pattern", 0)


# -- reading: Collect equals transformers' weights, keys from each row's first prompt token -----

@pytest.mark.parametrize("side", ["left", "right"])
def test_collected_patterns_are_the_attention_weights(lm, side):
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=1, head=(1, 0), positions="all"), rg.Collect(), name="p")
    out = g.run(lm, BASE, padding_side=side)
    assert lm.hf.config._attn_implementation == "sdpa"        # the model's own, put back
    for b, prompt in enumerate(BASE):
        ids = lm.tokenizer([prompt], return_tensors="pt")["input_ids"]
        with eager(lm.hf):
            want = lm.hf(input_ids=ids, output_attentions=True).attentions[1][0]     # [H, Q, K]
        n = ids.shape[1]
        got = out["p"][b, :n]                                                        # [Q, 2 heads, K]
        torch.testing.assert_close(got[:, 0, :n], want[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[:, 1, :n], want[0], atol=ATOL, rtol=0)
        assert float(got[:, :, n:].abs().max() if got.shape[-1] > n else 0) == 0   # past the prompt: nothing
        torch.testing.assert_close(got.sum(-1), torch.ones(n, 2), atol=1e-5, rtol=0)


# -- editing: the same edit in plain PyTorch, outputs and gradients -----------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("selector", ["last", [0, -2], "all"])
def test_an_edit_equals_plain_pytorch_with_gradients(lm, side, selector):
    op = Sharpen(alpha=1.5)
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=1, head=1, positions=selector), op, name="n")
    out = g.run(lm, BASE, padding_side=side)
    mask = out.attention_mask[out.rows["base"]]
    weights = torch.randn(out.logits.shape[-1], generator=torch.Generator().manual_seed(1))
    ours = sum((out.logits[b, real] * weights).sum() for b, real in enumerate(real_positions(mask)))
    (ours_grad,) = torch.autograd.grad(ours, [op.alpha])
    changed, ref_total = False, 0.0
    for b, prompt in enumerate(BASE):
        n = len(lm.tokenizer(prompt)["input_ids"])
        queries = positions_of(selector, n)

        def fn(p, queries=queries):
            p = p.clone()
            p[:, 1, queries] = op(p[:, 1, queries])
            return p

        ref = alone(lm, prompt, 1, fn)
        torch.testing.assert_close(out.logits[b, real_positions(mask)[b]], ref, atol=ATOL, rtol=0)
        ref_total = ref_total + (ref * weights).sum()
        changed |= not torch.allclose(ref, alone(lm, prompt), atol=1e-6)
    (ref_grad,) = torch.autograd.grad(ref_total, [op.alpha])
    torch.testing.assert_close(ours_grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert changed, "the edit changed nothing: the oracle compared no-ops"


@pytest.mark.parametrize("side", ["left", "right"])
def test_patching_a_pattern_moves_the_source_rows_weights(lm, side):
    """Patch writes the source prompt's pattern, key j of the source's prompt onto key j of
    the base's (prompts of other lengths, so the padded indices differ on the left)."""
    sources = ["a cow", "my hat was on top of it"]
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=1, head=0, positions="last"), rg.Patch("source"), name="n")
    out = g.run(lm, BASE, sources={"source": sources}, padding_side=side)
    mask = out.attention_mask[out.rows["base"]]
    for b, (prompt, source) in enumerate(zip(BASE, sources)):
        n = len(lm.tokenizer(prompt)["input_ids"])
        ids = lm.tokenizer([source], return_tensors="pt")["input_ids"]
        with eager(lm.hf):
            pattern = lm.hf(input_ids=ids, output_attentions=True).attentions[1][0, 0, -1]   # [source keys]
        row = torch.zeros(n)
        row[:min(n, len(pattern))] = pattern[:n]

        def fn(p, row=row):
            p = p.clone()
            p[:, 0, -1] = row
            return p

        torch.testing.assert_close(out.logits[b, real_positions(mask)[b]], alone(lm, prompt, 1, fn), atol=ATOL,
                                   rtol=0)


def test_zero_pattern_silences_the_head(lm):
    """All of head h's probabilities at zero: head_out of h is zero there, the others untouched."""
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=0, head=1, positions="last"), rg.Ablate("zero"), name="z")
    g.add(rg.Site("head_out", layer=0, positions="last"), rg.Collect(), name="heads")
    clean = rg.Graph()
    clean.add(rg.Site("head_out", layer=0, positions="last"), rg.Collect(), name="heads")
    edited, before = g.run(lm, BASE)["heads"], clean.run(lm, BASE)["heads"]
    assert float(edited[:, :, 1].abs().max()) == 0
    others = [h for h in range(lm.arch.heads("head_out")) if h != 1]
    torch.testing.assert_close(edited[:, :, others], before[:, :, others], atol=1e-5, rtol=0)


# -- what is refused, and the model left as it was ------------------------------------------------

@pytest.mark.parametrize("op, message", [
    (lambda: rg.Add(torch.ones(5)), "attn_pattern has one entry per key token, not a fixed width"),
    (lambda: rg.LoReFT(width=8, rank=2), "not a fixed width"),
])
def test_ops_with_a_width_are_refused(op, message):
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=0, head=0), op(), name="n")
    with pytest.raises(rg.SiteError, match=message):
        g.run(lm, BASE)


def test_the_model_keeps_its_attention_after_an_error():
    lm = rg.models.tiny("llama")

    class Broken(rg.Op):
        def forward(self, h, source=None, valid=None):
            raise RuntimeError("broken op")

    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=0, head=0), Broken(), name="n")
    with pytest.raises(Exception, match="broken op"):
        g.run(lm, BASE)
    assert lm.hf.config._attn_implementation == "sdpa"
    plain = rg.Graph().run(lm, BASE).logits
    torch.testing.assert_close(plain, rg.Graph().run(lm, BASE).logits)


def test_remote_runs_refuse_it():
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=0, head=0), rg.Collect(), name="n")
    with pytest.raises(rg.RemoteError, match="attn_pattern needs eager attention"):
        g.run(lm, BASE, remote="local")


class FirstKey(rg.Op):
    """All attention on the first prompt token (an attention sink)."""

    def forward(self, h, source=None, valid=None):
        return torch.zeros_like(h).index_fill(-1, torch.tensor([0], device=h.device), 1.0)


def test_generation_edits_the_pattern_of_every_new_token(lm):
    """positions="all": the prompt's queries and each generated token's, as plain PyTorch does
    to every query (keys counted from the prompt's first token, here unpadded)."""
    g = rg.Graph()
    for layer in (0, 1):
        g.add(rg.Site("attn_pattern", layer=layer, positions="all"), FirstKey(), name=f"n{layer}")
    ours = g.generate(lm, ["the cat sat"], max_new_tokens=5).new_ids[0]
    ids = lm.tokenizer(["the cat sat"], return_tensors="pt")["input_ids"]
    kw = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with torch.no_grad(), eager(lm.hf):
        undo = [softmax_edit(lm, layer, lambda p: FirstKey()(p)) for layer in (0, 1)]
        try:
            ref = lm.hf.generate(**kw)[0, ids.shape[1]:]
        finally:
            for u in reversed(undo):
                u()
        plain = lm.hf.generate(**kw)[0, ids.shape[1]:]
    assert ours.tolist() == ref.tolist()
    assert ours.tolist() != plain.tolist(), "the edit changed nothing: the check compared no-ops"
    assert lm.hf.config._attn_implementation == "sdpa"


# -- keys=: key tokens selected beside the query positions ----------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_keys_select_key_tokens_counted_in_each_prompt(lm, side):
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=1, head=0, positions="last", keys=[0, -1]), rg.Collect(), name="p")
    g.add(rg.Site("attn_pattern", layer=1, head=0, positions="last"), rg.Collect(), name="all")
    out = g.run(lm, BASE, padding_side=side)
    for b, prompt in enumerate(BASE):
        n = len(lm.tokenizer(prompt)["input_ids"])
        row = out["all"][b, 0, 0]
        torch.testing.assert_close(out["p"][b, 0, 0], row[[0, n - 1]], atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_edit_of_selected_keys_equals_plain_pytorch(lm, side):
    """Ablate("zero") on key 0 of head 1 at the last query: that probability alone is 0."""
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=1, head=1, positions="last", keys=[0]), rg.Ablate("zero"), name="z")
    out = g.run(lm, BASE, padding_side=side)
    mask = out.attention_mask[out.rows["base"]]
    for b, prompt in enumerate(BASE):
        def fn(p):
            p = p.clone()
            p[:, 1, -1, 0] = 0
            return p

        torch.testing.assert_close(out.logits[b, real_positions(mask)[b]], alone(lm, prompt, 1, fn), atol=ATOL,
                                   rtol=0)


def test_keys_are_checked_and_saved():
    site = rg.Site("attn_pattern", layer=1, head=0, positions="last", keys="f1+l1")
    assert str(site) == "attn_pattern[1].h0 pos=last keys=f1+l1"
    assert rg.Site.from_dict(site.to_dict()) == site and "keys" not in rg.Site("q", layer=0).to_dict()
    with pytest.raises(rg.SiteError, match="resid_post has no key axis; keys= is only for attn_pattern"):
        rg.Site("resid_post", layer=0, keys=[0])
    with pytest.raises(rg.SiteError, match="key tokens are selected by ints"):
        rg.Site("attn_pattern", layer=0, keys="generated")
    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=0, head=0, keys=[7]), rg.Collect(), name="far")
    with pytest.raises(rg.SiteError, match=r"node 'far' .*key selection: positions \[7\] are beyond the prompt of "
                                           r"row 1 \(5 tokens: valid positions 0\.\.4"):
        g.run(rg.models.tiny("llama"), BASE)


def test_a_pattern_read_after_a_hook_earlier_in_the_same_attention():
    # q is read inside the attention before its softmax: the trace must not run past the pattern
    lm = rg.models.tiny("llama")          # (a fresh model: nothing has touched its attention's operations yet)
    g = rg.Graph()
    g.add(rg.Site("q", layer=0, positions="all"), rg.Collect(), name="q")
    g.add(rg.Site("attn_pattern", layer=0, positions="all"), rg.Collect(), name="p")
    both = g.run(lm, BASE)
    alone = rg.Graph()
    alone.add(rg.Site("attn_pattern", layer=0, positions="all"), rg.Collect(), name="p")
    torch.testing.assert_close(both["p"], alone.run(lm, BASE)["p"], atol=0, rtol=0)
    assert both["q"].abs().sum() > 0
