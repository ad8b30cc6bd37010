"""The resolver finds each architecture's components and proves them; what fails is refused."""

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import reftgraph as rg
from oracle import encode, real_positions
from reftgraph.arch import proofs

COMMON = dict(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=128)
CONFIGS = {
    "llama": SMALL, "qwen3": SMALL, "olmo2": SMALL, "gemma2": SMALL, "phi3": SMALL, "cohere": SMALL,
    "gemma3_text": dict(SMALL, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
    "phi": dict(SMALL, num_key_value_heads=4),
    "mixtral": dict(SMALL, num_local_experts=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     use_parallel_residual=True),
    "granite": dict(SMALL, residual_multiplier=0.5),
    "lfm2": dict(SMALL, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"]),
}


def build(model_type, seed=0):
    config = AutoConfig.for_model(model_type, **COMMON, **CONFIGS[model_type])
    torch.manual_seed(seed)
    return rg.wrap(AutoModelForCausalLM.from_config(config), rg.models.tiny_tokenizer(), name=f"tiny-{model_type}")


@pytest.mark.parametrize("model_type, style", [
    ("llama", "sequential"), ("qwen3", "sequential"), ("gpt2", "sequential"), ("mixtral", "sequential"),
    ("gemma2", "post_norm"), ("gemma3_text", "post_norm"), ("olmo2", "post_norm"),
    ("gptj", "parallel"), ("gpt_neox", "parallel"), ("phi", "parallel"), ("cohere", "parallel"),
    ("falcon", "parallel"), ("bloom", "inner_residual")])
def test_block_style_is_found_by_its_identities(model_type, style):
    assert build(model_type).arch.blocks[0].style == style


@pytest.mark.parametrize("model_type, layout", [
    ("llama", "separate"), ("gpt2", "concat"), ("phi3", "concat"), ("gpt_neox", "per_head"), ("bloom", "per_head"),
    ("falcon", "grouped")])
def test_qkv_layout_is_proven_by_locality(model_type, layout):
    lm = build(model_type)
    assert lm.arch.blocks[0].qkv_layout == layout
    assert all(lm.arch.table()[c] == "verified" for c in "qkv")


@pytest.mark.parametrize("side", ["left", "right"])
def test_olmo2_resid_mid_is_what_the_block_adds(side):
    """Regression: OLMo2 adds post_attention_layernorm(attn); resid_pre + attn is not its stream."""
    lm = build("olmo2")
    prompts = ["the cat sat", "a dog ran far away"]
    delta = torch.randn(32, generator=torch.Generator().manual_seed(3))
    g = rg.Graph()
    g.add(rg.Site("resid_mid", layer=1, positions="all"), rg.Add(delta), name="steer")
    ours = g.run(lm, prompts, padding_side=side)
    inputs = encode(lm.tokenizer, prompts, side)
    norm = lm.hf.model.layers[1].post_attention_layernorm   # what the block adds to the stream
    handle = norm.register_forward_hook(lambda m, a, out: out + delta)
    try:
        ref = lm.hf(**inputs).logits
    finally:
        handle.remove()
    for b, (mine, theirs) in enumerate(zip(real_positions(ours.attention_mask), real_positions(inputs["attention_mask"]))):
        torch.testing.assert_close(ours.logits[b, mine], ref[b, theirs], atol=1e-5, rtol=0)


def test_olmo2_q_and_k_fail_locality_and_are_refused():
    """OLMo2 normalises q and k over all heads at once: editing one head's q moves every head."""
    table = build("olmo2").arch.table()
    assert "locality check failed" in table["q"] and "locality check failed" in table["k"]
    assert table["v"] == "verified" and table["head_out"] == "verified"


@pytest.mark.parametrize("model_type", ["gptj", "falcon"])
def test_parallel_blocks_refuse_resid_mid_before_any_forward(model_type):
    lm = build(model_type)
    calls = []
    lm.hf.register_forward_pre_hook(lambda m, a: calls.append(1))
    g = rg.Graph()
    g.add(rg.Site("resid_mid", layer=0), rg.Collect(), name="mid")
    with pytest.raises(rg.SiteError, match=f"node 'mid' at resid_mid.*{model_type} refuses resid_mid at layer 0: "
                                           "parallel block"):
        g.run(lm, ["hello"])
    assert not calls


def test_mixture_of_experts_keeps_mlp_out_and_refuses_mlp_act():
    table = build("mixtral").arch.table()
    assert table["mlp_out"] == "verified"
    assert "no single down projection in 'mlp'" in table["mlp_act"]


def test_scaled_residuals_are_the_scaled_additions_read_from_the_block():
    """Granite scales what it adds (residual_multiplier): the scaled style, its scale the block's own."""
    lm = build("granite")
    block = lm.arch.blocks[0]
    assert block.style == "scaled" and lm.arch.table()["attn_out"] == "verified"
    assert block.scales["attn_out"] == ("residual_multiplier", lm.hf.config.residual_multiplier)


def test_hybrid_attention_components_only_where_attention_is():
    lm = build("lfm2")   # conv, attention, conv, attention
    assert [b.paths.attn for b in lm.arch.blocks] == [None, "self_attn", None, "self_attn"]
    g = rg.Graph()
    g.add(rg.Site("head_out", layer=0, head=1), rg.Collect(), name="h")
    with pytest.raises(rg.SiteError, match=r"layer 0: this block has no attention .*exists on layers 1, 3"):
        g.run(lm, ["hello"])
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=0, positions="last"), rg.Collect(), name="m")
    g.add(rg.Site("head_out", layer=1, head=1, positions="last"), rg.Collect(), name="h")
    out = g.run(lm, ["hello"])
    assert out["m"].shape == (1, 1, 32) and out["h"].shape == (1, 1, 1, 8)


def test_proofs_are_cached_per_config():
    proofs.forget()
    config = AutoConfig.for_model("qwen3", **COMMON, **CONFIGS["qwen3"])
    hf = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    rg.wrap(hf, rg.models.tiny_tokenizer())
    first = time.perf_counter() - start
    assert len(proofs._CACHE) == 1
    rg.wrap(AutoModelForCausalLM.from_config(config), rg.models.tiny_tokenizer())
    assert len(proofs._CACHE) == 1   # the same config is proven once
    assert first > 0


def test_registered_family_overrides_paths_and_is_still_proven(monkeypatch):
    from reftgraph.arch import structure

    monkeypatch.setattr(structure, "FAMILIES", {})
    rg.register_family(rg.Family(name="wrong_mlp", model_types=("llama",), mlp="input_layernorm"))
    table = build("llama").arch.table()
    assert "no block style's identities hold" in table["mlp_out"]


def test_unreadable_module_tree_says_what_it_found_and_how_to_register(monkeypatch):
    from reftgraph.arch import structure

    monkeypatch.setattr(structure, "FAMILIES", {})
    hf = rg.models.tiny("llama").hf
    hf.model.layers = torch.nn.Sequential(*hf.model.layers)   # no ModuleList of blocks any more
    calls = []
    hf.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(rg.SiteError, match="no list of 2 blocks in the module tree") as err:
        rg.wrap(hf, rg.models.tiny_tokenizer())
    assert "rg.register_family(rg.Family(" in str(err.value) and not calls
    rg.register_family(rg.Family(name="sequential_llama", model_types=("llama",), layers="model.layers"))
    lm = rg.wrap(hf, rg.models.tiny_tokenizer())   # the example from the message works
    assert lm.arch.family.name == "sequential_llama" and lm.arch.table()["attn_out"] == "verified"
