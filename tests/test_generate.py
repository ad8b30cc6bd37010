"""Generation with a graph against transformers' generate with plain hooks."""

import pytest
import torch

import reftgraph as rg

PROMPTS = ["hello there", "hi", "a longer prompt"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def lm(request):
    return rg.models.tiny(request.param)


def layer0(lm):
    fam = lm.arch.family.name
    return {"llama": lambda: lm.hf.model.layers[0], "gpt2": lambda: lm.hf.transformer.h[0],
            "gpt_neox": lambda: lm.hf.gpt_neox.layers[0]}[fam]()


def oracle_generate(lm, vec, positions, max_new_tokens):
    """Left-padded hf.generate with an Add at resid_post[0] applied by a plain hook."""
    tok = lm.tokenizer
    tok.padding_side, side = "left", tok.padding_side
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    tok.padding_side = side
    mask = enc["attention_mask"]
    calls = []

    def hook(mod, args, out):
        out = out.clone()
        first = not calls
        calls.append(1)
        if first and positions in ("last", "all"):
            if positions == "last":
                out[:, -1] += vec
            else:
                out += vec * mask[..., None]
        if not first and positions in ("generated", "all"):
            out[:, -1] += vec
        return out

    h = layer0(lm).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    finally:
        h.remove()


@pytest.mark.parametrize("positions", ["last", "generated", "all"])
def test_generate_matches_hooks(lm, positions):
    vec = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0)) * 3
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions=positions), rg.Add(vec))
    out = g.generate(lm, PROMPTS, max_new_tokens=6, min_new_tokens=6)
    ref = oracle_generate(lm, vec, positions, 6)
    assert torch.equal(out.ids, ref)
    plain = rg.Graph().generate(lm, PROMPTS, max_new_tokens=6, min_new_tokens=6)
    assert not torch.equal(out.ids, plain.ids), "the edit should change what is generated"
    assert out.texts == lm.tokenizer.batch_decode(ref[:, out.prompt_length:], skip_special_tokens=True)


def test_batched_generation_equals_one_by_one(lm):
    vec = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(1))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="f1+l1"), rg.Add(vec))
    batched = g.generate(lm, PROMPTS, max_new_tokens=5, min_new_tokens=5)
    for i, p in enumerate(PROMPTS):
        single = g.generate(lm, [p], max_new_tokens=5, min_new_tokens=5)
        assert single.new_ids[0].tolist() == batched.new_ids[i].tolist()


def test_generation_stops_early_and_returns(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="generated"), rg.Add(torch.zeros(lm.arch.d_model)))
    plain = rg.Graph().generate(lm, PROMPTS[:1], max_new_tokens=4)
    second = int(plain.new_ids[0, 1])  # make the second generated token the end of sequence
    out = g.generate(lm, PROMPTS[:1], max_new_tokens=20, eos_token_id=second)
    assert out.new_ids.shape[1] <= 2 and out.new_ids[0, -1] == second


def test_generate_refuses_sources(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Patch("source"), name="p")
    with pytest.raises(rg.SiteError, match="node 'p'.*base stream only"):
        g.generate(lm, PROMPTS)
