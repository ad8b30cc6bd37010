"""Streams not laid out as ``[batch, tokens, width]`` (``reftgraph.arch.streams``): XLNet's
tokens-first stream and the several vectors per token of hyper-connections (DeepSeek V4,
HunYuan V4, Qwen4-exp), AltUp (Gemma 3n) and ProphetNet's predicting streams.
``resid_pre`` / ``resid_post`` against the same edits written as plain PyTorch hooks on the
block, each layout written out by hand from the transformers source; outputs and gradients,
each padding side the model runs, and generation."""

import pytest
import torch

import reftgraph as rg
from oracle import padded

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5


# type -> (where a token's stream vectors are in the raw tensor, written from the transformers
# source: (t, row, position) -> a view [n, width] or [width]; the block list's path; streams n)
LAYOUTS = {"xlnet": (lambda t, r, p: t[p, r], "transformer.layer", 1),              # [tokens, batch, width]
           "deepseek_v4": (lambda t, r, p: t[r, p], "model.layers", 2),            # [batch, tokens, n, width]
           "hy_v4": (lambda t, r, p: t[r, p], "model.layers", 2),
           "gemma3n_text": (lambda t, r, p: t[:, r, p], "model.layers", 2),        # [n, batch, tokens, width]
           "qwen4_exp_text": (lambda t, r, p: t[r, p], "model.layers", 2),         # [batch, tokens, n * width]
           # ProphetNet: [batch, 3 * tokens, width], the main stream's tokens, then each predicting stream's
           "prophetnet": (lambda t, r, p: t[r].unflatten(0, (3, -1))[:, p], "prophetnet.decoder.layers", 3)}


def _add(at, t, row, pos, v):
    view = at(t, row, pos)
    view += v.view_as(view)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def lm(request):
    return rg.models.tiny(request.param)


def _cases(lm):
    """``(padding side, prompts)`` to test on: each side the model pads correctly, else one prompt."""
    return [(s, BASE) for s in ("left", "right") if s not in lm.arch.padding] or [("right", BASE[:1])]


def _blocks(lm):
    module = lm.hf
    for part in LAYOUTS[lm.hf.config.model_type][1].split("."):
        module = getattr(module, part)
    return module


def plain(lm, prompts, side, edit, component, layer=1):
    """Logits (and each row's real token indices) with ``edit(stream, real)`` applied where
    ``component`` is: the block's input or output."""
    inputs, real = padded(lm, prompts, side)
    block = _blocks(lm)[layer]
    if component == "resid_post":
        handle = block.register_forward_hook(
            lambda m, a, out: (edit(out[0], real),) + tuple(out[1:]) if isinstance(out, tuple) else edit(out, real))
    else:
        def pre(m, args, kwargs):
            if args:
                return (edit(args[0], real),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], real)}
        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return lm.hf(**inputs).logits, real
    finally:
        handle.remove()


def test_the_stream_is_found_with_its_width(lm):
    n = LAYOUTS[lm.hf.config.model_type][2]
    assert lm.arch.width("resid_post", 1) == n * lm.arch.d_model
    assert lm.arch.blocks[1].stream is not None
    why = lm.arch.refusal("mlp_out", 1)
    assert why and "laid out as" in why


@pytest.mark.parametrize("component", ["resid_pre", "resid_post"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, component):
    at = LAYOUTS[lm.hf.config.model_type][0]
    width = lm.arch.width(component, 1)
    vector = torch.randn(width, generator=torch.Generator().manual_seed(0))
    for side, prompts in _cases(lm):
        op = rg.Add(vector.clone(), scale=1.5, trainable=True)
        g = rg.Graph()
        g.add(rg.Site(component, layer=1, positions="last"), op, name="a")
        ours = g.run(lm, prompts, padding_side=side).next_token_logits
        (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])

        v = vector.clone().requires_grad_(True)

        def edit(t, real):
            t = t.clone()
            for row, idx in enumerate(real):
                _add(at, t, row, idx[-1], 1.5 * v)
            return t
        logits, real = plain(lm, prompts, side, edit, component)
        want = torch.stack([logits[row, idx[-1]] for row, idx in enumerate(real)])
        (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
        torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
        # (Gemma 3n's own gradient is NaN under left padding, hooks or not: ours must be NaN there too)
        torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4, equal_nan=True)
        assert not torch.allclose(ours, rg.Graph().run(lm, prompts, padding_side=side).next_token_logits, atol=1e-4)


def test_collect_is_the_stream_laid_out_by_hand_and_set_puts_it_back(lm):
    at = LAYOUTS[lm.hf.config.model_type][0]
    for side, prompts in _cases(lm):
        g = rg.Graph()
        g.add(rg.Site("resid_post", layer=1), rg.Collect(), name="c")
        out = g.run(lm, prompts, padding_side=side)
        seen = {}

        def keep(t, real):
            seen["t"] = t.detach().clone()
            return t
        with torch.no_grad():
            _, real = plain(lm, prompts, side, keep, "resid_post")
        for row, idx in enumerate(real):
            want = torch.stack([at(seen["t"], row, p).reshape(-1) for p in idx])
            torch.testing.assert_close(out["c"][row, :len(idx)], want, atol=ATOL, rtol=0)
        g2 = rg.Graph()        # the view's inverse: setting what was read changes nothing
        g2.add(rg.Site("resid_post", layer=1), rg.Set(out["c"].detach()), name="s")
        torch.testing.assert_close(g2.run(lm, prompts, padding_side=side).logits, out.logits, atol=ATOL, rtol=0)


def test_a_real_model_with_more_streams_gets_its_own_width():
    """The proofs run on a tiny copy with 2 streams; a model with 3 is viewed 3 wide, and an
    edit of that width equals the plain hook."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from reftgraph.arch.shrink import shrink

    config = shrink(AutoConfig.for_model("deepseek_v4"))
    config.hc_mult = 3
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    lm = rg.wrap(hf, rg.models.tiny_tokenizer())
    assert lm.arch.width("resid_post", 1) == 3 * lm.arch.d_model
    vector = torch.randn(3 * lm.arch.d_model, generator=torch.Generator().manual_seed(1))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Add(vector), name="a")
    ours = g.run(lm, BASE, padding_side="right").next_token_logits

    def edit(t, real):
        t = t.clone()
        for row, idx in enumerate(real):
            _add(LAYOUTS["deepseek_v4"][0], t, row, idx[-1], vector)
        return t
    logits, real = plain(lm, BASE, "right", edit, "resid_post")
    torch.testing.assert_close(ours, torch.stack([logits[r, idx[-1]] for r, idx in enumerate(real)]), atol=ATOL, rtol=0)


def test_a_vector_of_the_model_width_is_refused_before_any_forward():
    lm = rg.models.tiny("deepseek_v4")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1), rg.Add(torch.zeros(lm.arch.d_model)), name="a")
    with pytest.raises(rg.SiteError, match="128"):
        g.run(lm, BASE)


@pytest.mark.parametrize("kind", ["deepseek_v4", "gemma3n_text", "qwen4_exp_text", "prophetnet"])
def test_generation_steers_each_new_token_as_the_plain_hook(kind):
    """``positions="generated"`` adds to each new token's streams: the same tokens as
    ``hf.generate`` with a plain hook adding to the last position of every pass but the first."""
    lm = rg.models.tiny(kind)
    at = LAYOUTS[kind][0]
    vector = 3 * torch.randn(lm.arch.width("resid_post", 1), generator=torch.Generator().manual_seed(2))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="generated"), rg.Add(vector), name="s")
    got = g.generate(lm, BASE[:1], max_new_tokens=5, min_new_tokens=5)
    inputs, real = padded(lm, BASE[:1], "right")
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) == 1:         # the prompt's pass: no generated token yet
            return None
        t = (out[0] if isinstance(out, tuple) else out).clone()
        _add(at, t, 0, -1, vector)
        return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
    handle = _blocks(lm)[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = lm.hf.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  max_new_tokens=5, min_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) > 2
    assert torch.equal(got.ids, want)
    assert not torch.equal(got.ids, rg.Graph().generate(lm, BASE[:1], max_new_tokens=5, min_new_tokens=5).ids)
