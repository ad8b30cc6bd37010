"""Encoders (BERT, DistilBERT, ModernBERT: attention both ways) wrapped through the same
resolver and proofs: an empty graph runs each exactly as it runs itself, edits equal the same
edits written as plain PyTorch hooks (outputs and gradients, both padding sides), a key edit
reaches every position, and a Classify head trains on them."""

import pytest
import torch
from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, T5Config,
                          T5Model)

import reftgraph as rg
from oracle import padded
from reftgraph.arch.shrink import tiny_config_of

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5
LAYER = 1


def build(model_type, auto=AutoModel):
    torch.manual_seed(0)
    return rg.wrap(auto.from_config(tiny_config_of(model_type), dtype=torch.float32), rg.models.tiny_tokenizer(),
                   name=f"tiny-{model_type}")


@pytest.fixture(scope="module")
def bert():
    return build("bert")


batch = padded


def own(lm, side, hooks=()):
    """Each row's real positions of the model's own per-token output, with plain forward hooks."""
    inputs, real = batch(lm, BASE, side)
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        out = lm.hf(**inputs)
    finally:
        for h in handles:
            h.remove()
    value = out.logits if getattr(out, "logits", None) is not None and out.logits.dim() == 3 else out.last_hidden_state
    return [value[row, idx] for row, idx in enumerate(real)], real


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type,auto", [("bert", AutoModel), ("bert", AutoModelForMaskedLM),
                                             ("distilbert", AutoModel), ("modernbert", AutoModel)])
def test_an_empty_graph_runs_the_encoder_as_it_runs_itself(model_type, auto, side):
    lm = build(model_type, auto)
    out = rg.Graph().run(lm, BASE, padding_side=side)
    with torch.no_grad():
        want, real = own(lm, side)
    for row, idx in enumerate(real):
        got = out.logits[row, :len(idx)] if side == "right" else out.logits[row, -len(idx):]
        torch.testing.assert_close(got, want[row], atol=ATOL, rtol=0)


def test_encoders_are_proven_with_their_block_styles():
    assert build("bert").arch.blocks[0].style == "post_ln"
    assert build("modernbert").arch.blocks[0].style == "sequential"
    for c in ("attn_out", "mlp_out", "head_out", "q", "k", "v", "attn_pattern"):
        assert build("distilbert").arch.refusal(c, LAYER) is None, c


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("component,path", [("attn_out", "attention.output.dense"), ("mlp_out", "output.dense")])
def test_add_equals_the_plain_hook_outputs_and_gradients(bert, side, component, path):
    vector = torch.randn(bert.arch.d_model, generator=torch.Generator().manual_seed(1))
    op = rg.Add(vector.clone(), trainable=True)
    g = rg.Graph()
    g.add(rg.Site(component, layer=LAYER, positions=[0]), op, name="a")
    out = g.run(bert, BASE, padding_side=side)
    _, real = batch(bert, BASE, side)
    ours = torch.stack([out.logits[row, idx[-1] if side == "left" else len(idx) - 1] for row, idx in enumerate(real)])
    (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])

    v = vector.clone().requires_grad_(True)
    module = bert.hf.encoder.layer[LAYER].get_submodule(path)

    def edit(m, args, out):
        t = out.clone()
        for row, idx in enumerate(real):
            t[row, idx[0]] = t[row, idx[0]] + v
        return t
    want, _ = own(bert, side, [(module, edit)])
    want = torch.stack([w[-1] for w in want])
    (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_a_key_edit_at_the_last_token_reaches_the_first(bert):
    g = rg.Graph()
    g.add(rg.Site("k", layer=LAYER, head=0, positions="last"), rg.Ablate("zero"), name="z")
    edited, clean = g.run(bert, ["the cat sat"]).logits, rg.Graph().run(bert, ["the cat sat"]).logits
    assert not torch.allclose(edited[0, 0], clean[0, 0], atol=1e-5)   # attention runs both ways


def test_a_classify_head_with_loreft_trains_on_an_encoder():
    lm = build("bert", AutoModelForSequenceClassification)
    texts = [f"{w} {x}" for w in ("good", "bad") for x in ("film", "play", "book", "song")]
    data = rg.data.Classification(texts, [int(t.startswith("good")) for t in texts])
    g = rg.reft_graph(lm, layers=[LAYER], positions="all", rank=2)
    g.add(rg.Site("resid_post", layer=-1, positions=[0]), rg.Classify(lm.arch.d_model, 2), name="cls")
    history = rg.train(g, lm, data, epochs=15, lr=2e-2, progress=False, batch_size=8)
    assert history["loss"].iloc[-1] < 0.5 * history["loss"].iloc[0]
    predicted = g.run(lm, texts)["cls"].argmax(-1).tolist()
    assert predicted == data.labels


def test_generation_and_bare_encoder_decoders_are_refused_clearly(bert):
    with pytest.raises(rg.SiteError, match="cannot generate"):
        rg.Graph().generate(bert, ["the cat"], max_new_tokens=2)
    t5 = T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=300))
    with pytest.raises(rg.SiteError, match="encoder-decoder without a language-model head"):
        rg.wrap(t5, rg.models.tiny_tokenizer())
