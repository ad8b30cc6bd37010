"""DiffMean steering vectors: read against plain hidden states, applied, swept, refused."""

import pytest
import torch

import reftgraph as rg
from oracle import encode, real_positions

POSITIVE = ["I love this film", "what a great day", "so good"]
NEGATIVE = ["I hate this film", "what an awful day", "so bad"]


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama", num_hidden_layers=3)


def plain_means(lm, prompts, layer, side="right"):
    """Per prompt, the mean of resid_post[layer] over its real tokens, from output_hidden_states."""
    inputs = encode(lm.tokenizer, prompts, side)
    with torch.no_grad():
        hidden = lm.hf(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    return torch.stack([hidden[b, r].mean(0) for b, r in enumerate(real_positions(inputs["attention_mask"]))])


def test_diffmean_is_the_difference_of_plain_means(lm):
    g = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, rg.Site("resid_post", layer=1, positions="all"))
    want = plain_means(lm, POSITIVE, 1).mean(0) - plain_means(lm, NEGATIVE, 1).mean(0)
    torch.testing.assert_close(g["steer"].op.vector, want, atol=1e-5, rtol=0)
    assert g["steer"].site == rg.Site("resid_post", layer=1, positions="all")


def test_adding_it_moves_the_negative_mean_onto_the_positive_mean(lm):
    site = rg.Site("resid_post", layer=1, positions="last")
    g = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, site, apply_positions="last")
    g.add(rg.Site("resid_pre", layer=2, positions="last"), rg.Collect(), name="after")
    moved = g.run(lm, NEGATIVE)["after"][:, 0].mean(0)
    pos, _ = rg.steering.contrast(lm, POSITIVE, NEGATIVE, site)
    torch.testing.assert_close(moved, pos.mean(0), atol=1e-5, rtol=0)


def test_pca_direction_is_signed_and_scaled_like_the_mean(lm):
    site = rg.Site("mlp_out", layer=0, positions="last")
    mean = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, site)["steer"].op.vector
    pca = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, site, method="pca")["steer"].op.vector
    assert torch.isclose(pca.norm(), mean.norm()) and float(pca @ mean) > 0
    pos, neg = rg.steering.contrast(lm, POSITIVE, NEGATIVE, site)
    top = torch.linalg.svd(pos - neg).Vh[0]
    assert torch.isclose((pca / pca.norm()) @ top, torch.tensor(1.0), atol=1e-5) or \
        torch.isclose((pca / pca.norm()) @ top, torch.tensor(-1.0), atol=1e-5)


def test_head_sites_give_per_head_vectors(lm):
    g = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, rg.Site("head_out", layer=1, head=2, positions="last"))
    assert g["steer"].op.vector.shape == (1, 8)
    assert g.run(lm, ["hi"]).logits.isfinite().all()


def test_scale_sweep_reports_rate_and_fluency_and_restores_the_scale(lm):
    g = rg.steering.diffmean(lm, POSITIVE, NEGATIVE, rg.Site("resid_post", layer=1), scale=1.0)
    df = rg.steering.scale_sweep(lm, g, ["Today", "It"], [0.0, 30.0], lambda t: len(t) > 0, max_new_tokens=3)
    assert list(df["scale"]) == [0.0, 30.0] and df["rate"].between(0, 1).all() and (df["n"] == 2).all()
    plain = rg.Graph().generate(lm, ["Today", "It"], max_new_tokens=3).texts
    assert df["rate"][0] == sum(len(t) > 0 for t in plain) / 2
    assert df["texts"][0] == plain                    # the texts beside the rates: scale 0 generates as plain
    assert df["loss"][1] != df["loss"][0]       # steering this hard changes what the base model sees
    assert g["steer"].op.scale == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(positive=[]), "positive must be a non-empty list"),
    (dict(negative="no"), "negative must be a non-empty list"),
    (dict(method="median"), "method must be one of"),
    (dict(method="pca", negative=["a"]), "pairs prompts: 3 positive and 1 negative"),
])
def test_bad_input_is_refused_before_any_forward(lm, kwargs, match):
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda m, a: calls.append(1))
    args = {**dict(positive=POSITIVE, negative=NEGATIVE, site=rg.Site("resid_post", layer=0)), **kwargs}
    try:
        with pytest.raises(rg.DataError, match=match):
            rg.steering.diffmean(lm, **args)
    finally:
        handle.remove()
    assert not calls
