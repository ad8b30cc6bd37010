"""Models without weights: rg.load(..., dispatch=False) builds them on the meta device, and graphs
for them compile and are checked as for the real model (a Llama-3.1-405B-shaped config here)."""

import os

import pytest
from transformers import LlamaConfig

import reftgraph as rg
from reftgraph.engine.plan import compile_graph
from reftgraph.errors import SiteError

# Llama-3.1-405B's shape (config.json of meta-llama/Llama-3.1-405B, written out here)
LLAMA_405B = dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-405b")
    LlamaConfig(**LLAMA_405B).save_pretrained(path)
    rg.models.tiny_tokenizer().save_pretrained(path)
    before = rss_mb()
    lm = rg.load(str(path), dispatch=False)
    return lm, rss_mb() - before


def test_a_405b_config_builds_on_meta_and_graphs_compile(big):
    lm, grown = big
    assert lm.device.type == "meta" and grown < 1024
    a = lm.arch
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.d_mlp) == (126, 16384, 128, 8, 128, 53248)
    g = rg.reft_graph(lm, layers=[30, 60, 90, 125], positions="f5+l5", rank=4)
    g.add(rg.Site("head_out", 125, head=127, positions="last"), rg.Collect(), name="h")
    g.add(rg.Site("k", -1, head=7, positions=[0]), rg.Ablate("zero"), name="k")
    before = rss_mb()
    plan = compile_graph(g, a)
    assert rss_mb() - before < 1024
    assert len(plan.steps) == len(g.nodes)
    assert g.num_parameters() == 8 * (2 * 16384 * 4 + 4)


@pytest.mark.parametrize("site, match", [
    (rg.Site("resid_post", 126), "layer 126 out of range; valid layers 0..125"),
    (rg.Site("head_out", 3, head=128), "head 128 out of range; head_out has 128 heads: valid heads 0..127"),
    (rg.Site("v", 3, head=8), "valid heads 0..7"),
])
def test_a_405b_graph_is_checked_like_a_real_one(big, site, match):
    lm, _ = big
    g = rg.Graph()
    g.add(site, rg.Collect(), name="bad")
    with pytest.raises(SiteError, match=match):
        compile_graph(g, lm.arch)


def test_a_405b_op_of_the_wrong_width_is_refused(big):
    lm, _ = big
    with pytest.raises(SiteError, match=r"LoReFT has width 576, the site needs 16384"):
        compile_graph(_one(rg.Site("resid_post", 0), rg.LoReFT(width=576, rank=2)), lm.arch)


def _one(site, op):
    g = rg.Graph()
    g.add(site, op, name="n")
    return g


def test_running_a_model_without_weights_is_refused_before_any_forward(big):
    lm, _ = big
    g = _one(rg.Site("resid_post", 3, positions="last"), rg.Collect())
    for call in (lambda: g.run(lm, ["hello"]), lambda: g.generate(lm, ["hello"], max_new_tokens=2)):
        with pytest.raises(SiteError, match="has no weights .* rg.load\\(name_or_path\\)"):
            call()


def test_the_default_model_without_weights():
    lm = rg.load("smollm2-135m-instruct", dispatch=False)
    assert lm.device.type == "meta" and lm.arch.n_layers == 30
    assert all(p.is_meta for p in lm.hf.parameters())
    assert (lm.arch.n_heads, lm.arch.n_kv_heads) == (9, 3)
