"""The memorisation harness on a tiny model: a rank-1 ConsReFT at one prompt token makes greedy
decoding recover a short text exactly; partial recovery reports the first mismatch; cached
and uncached training agree; the text helpers and errors."""

import pytest
import torch

import reftgraph as rg
from reftgraph.memorisation import (exact_prefix, memorisation_graph, memorise, random_tokens, shuffled_words,
                                    target_ids)


@pytest.fixture(scope="module")
def lm():
    """A random tiny Llama wide enough (128) for one token to steer three more (the 32-wide
    default cannot: its random attention and MLP give one edited position too little reach)."""
    return rg.models.tiny("llama", num_hidden_layers=3, hidden_size=128, intermediate_size=512,
                          initializer_range=0.1)


def greedy(graph, model, prompt, n):
    return graph.generate(model, [prompt], max_new_tokens=n).new_ids[0].tolist()


def test_recovers_a_short_text_exactly(lm):
    target = target_ids(lm, "cat")
    assert greedy(rg.Graph(), lm, "#", 3) != target  # the model alone does not say it
    result = memorise(lm, "cat", prompt="#", layer=0, rank=1, lr=0.1, max_steps=200)
    assert (result.recovered, result.rate, result.first_mismatch) == (3, 1.0, None)
    assert 0 < result.steps < 200 and result.teacher_forced == 3
    assert result.graph.num_parameters() == 128 + 1  # rank-1 ConsReFT: one direction and one bias
    assert greedy(result.graph, lm, "#", 3) == target
    row = result.row()
    assert row["n_tokens"] == 3 and row["recovered"] == 3 and row["layer"] == 0


def test_partial_recovery_reports_the_first_mismatch(lm):
    result = memorise(lm, "Alice was", prompt="#", layer=0, lr=0.1, max_steps=5)
    target = target_ids(lm, "Alice was")
    out = greedy(result.graph, lm, "#", len(target))
    assert result.recovered == exact_prefix(out, target) < len(target)
    assert result.first_mismatch == result.recovered and out[result.first_mismatch] != target[result.first_mismatch]
    assert result.rate == pytest.approx(result.recovered / 9) and result.steps == 5


def test_cached_and_uncached_training_agree(lm):
    kw = dict(prompt="#", layer=1, lr=0.1, max_steps=4, greedy=False)
    a = memorise(lm, "cat", cache_prefix=True, **kw)
    b = memorise(lm, "cat", cache_prefix=False, **kw)
    assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.steps == b.steps == 4
    for (k, x), (_, y) in zip(a.graph.ops.named_parameters(), b.graph.ops.named_parameters()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_targets_and_helpers(lm):
    assert target_ids(lm, "hello", 2) == target_ids(lm, "he")
    assert target_ids(lm, [5, 6, 7], 2) == [5, 6]
    ids = random_tokens(lm, 50, seed=3)
    assert len(ids) == 50 and not set(ids) & set(lm.tokenizer.all_special_ids)
    assert ids == random_tokens(lm, 50, seed=3) != random_tokens(lm, 50, seed=4)
    text = "the quick brown fox jumps over the lazy dog"
    mixed = shuffled_words(text, seed=0)
    assert sorted(mixed.split()) == sorted(text.split()) and mixed != text
    g = memorisation_graph(lm, layer=-1, rank=2, op="LoReFT")
    assert str(g["memorise"].site) == "resid_post[-1] pos=last" and g["memorise"].op.rank == 2


def test_errors(lm):
    with pytest.raises(ValueError, match=r"n_tokens=9 out of range; the target has 3 tokens \(valid 1..3\)"):
        memorise(lm, "cat", layer=0, n_tokens=9)
    with pytest.raises(ValueError, match=r"token id 999 out of range; valid ids 0..258"):
        memorise(lm, [1, 999], layer=0)
    with pytest.raises(ValueError, match="unknown ReFT op"):
        memorise(lm, "cat", layer=0, op="Nope")
    with pytest.raises(rg.SiteError, match="layer 7 out of range"):
        memorise(lm, "cat", layer=7)
    with pytest.raises(ValueError, match="no tokens"):
        memorise(lm, "cat", layer=0, prompt="")


def test_the_authors_recovery_score_and_the_schedule():
    lm = rg.models.tiny("llama", initializer_range=0.5)
    constant = memorise(lm, "hello there", layer=1, lr=0.5, max_steps=40)
    linear = memorise(lm, "hello there", layer=1, lr=0.5, max_steps=40, schedule="linear")
    for result in (constant, linear):
        text = lm.tokenizer.decode(target_ids(lm, "hello there"))
        assert 0 <= result.char_rate <= 1 and "char_rate" in result.row()
        if result.recovered == result.n_tokens:
            assert result.char_rate == 1.0
        # characters before the first wrong token are all matched
        assert result.char_rate >= len(lm.tokenizer.decode(target_ids(lm, "hello there")[:result.recovered])) / len(text)
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'linear'"):
        memorise(lm, "h", layer=1, schedule="cosine")


def test_a_time_budget_stops_training():
    lm = rg.models.tiny("llama")
    result = memorise(lm, [5, 6, 7, 8], layer=1, lr=1e-6, max_steps=1000, max_seconds=0, greedy=False)
    assert result.steps == 0  # checked before the first step, already past the deadline
    assert memorise(lm, [5, 6, 7, 8], layer=1, lr=1e-6, max_steps=3, max_seconds=3600, greedy=False).steps == 3
