"""Patching sweeps and path patching against plain PyTorch hooks on tiny models."""

import matplotlib
import pytest
import torch

import reftgraph as rg
from reftgraph.patching import Counterfactual, Reference, logit_diff, path_patch, path_sweep, sweep
from oracle import capture, encode, install, real_positions

matplotlib.use("Agg")

# base and source rows of different lengths: negative positions line up at the end
DATA = Counterfactual(["ab c d e", "xy z w", "the cat sat"], ["b d c f", "xy wq zz", "the dog sat"],
                      correct=["c", "z", "a"], wrong=["d", "w", "o"])
SAME = Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def lm(request):
    return rg.models.tiny(request.param)


def hook_metric(lm, data, component, layer, pos, head, side):
    """One patched run with plain hooks: source's value at each row's ``pos`` -> base's ``pos``."""
    fam, cfg, tok = lm.arch.family.name, lm.hf.config, lm.tokenizer
    base, src = encode(tok, data.base, side), encode(tok, data.source, side)
    value = capture(lm.hf, fam, component, layer, src, cfg)
    b_real, s_real = real_positions(base["attention_mask"]), real_positions(src["attention_mask"])

    def edit(t):
        out = t.clone()
        for row in range(t.shape[0]):
            pairs = (zip(b_real[row], s_real[row]) if pos == "all" else [(b_real[row][pos], s_real[row][pos])])
            for p, s in pairs:
                if head is None:
                    out[row, p] = value[row, s]
                else:
                    out[row, p, head] = value[row, s, head]
        return out

    handles = install(lm.hf, fam, component, layer, edit, cfg)
    try:
        with torch.no_grad():
            logits = lm.hf(**base).logits
    finally:
        for h in handles:
            h.remove()
    last = torch.tensor([r[-1] for r in b_real])
    return logit_diff(logits[torch.arange(len(last)), last], Reference(*data.answer_ids(lm))).mean().item()


CASES = [("resid_pre", [-3, -2, -1], None), ("resid_mid", [0, -1], None), ("resid_post", [-2], None),
         ("attn_out", [-1], None), ("mlp_out", [-2, -1], None), ("mlp_act", [-1], None),
         ("head_out", [-1], [0, 3]), ("q", [-2], [1]), ("v", [-1], [0])]


@pytest.mark.parametrize("component,positions,heads", CASES)
def test_every_cell_equals_its_single_patched_run(lm, component, positions, heads):
    if lm.arch.table()[component] != "verified":
        pytest.skip(f"{lm.arch.family.name} has no {component} (refused; tests/test_resolver.py)")
    df = sweep(lm, DATA, component, positions=positions, heads=heads)
    n_heads = 1 if heads is None else len(heads)
    assert len(df) == lm.arch.n_layers * len(positions) * n_heads
    assert df["value"].std() > 0  # the conditions differ
    for i, row in enumerate(df.itertuples()):
        side = ("left", "right")[i % 2]
        head = None if heads is None else int(row.head)
        expected = hook_metric(lm, DATA, component, row.layer, row.position, head, side)
        assert row.value == pytest.approx(expected, abs=1e-5), (row, side)


@pytest.mark.parametrize("component", ["head_out", "mlp_out"])
def test_whole_sequence_patches(lm, component):
    df = sweep(lm, SAME, component, metric="kl")
    assert set(df["position"]) == {"all"}
    row = df.iloc[-1]
    head = None if component == "mlp_out" else int(row["head"])
    # KL of the source run to itself is 0, so restoration is 1 - KL(patched) / KL(base)
    assert row["restoration"] == pytest.approx(1 - row["value"] / df.attrs["base"])
    fam, cfg = lm.arch.family.name, lm.hf.config
    base = encode(lm.tokenizer, SAME.base, "left")
    src = encode(lm.tokenizer, SAME.source, "left")
    value = capture(lm.hf, fam, component, int(row["layer"]), src, cfg)

    def edit(t):
        out = t.clone()
        if head is None:
            return value.clone()
        out[:, :, head] = value[:, :, head]
        return out

    handles = install(lm.hf, fam, component, int(row["layer"]), edit, cfg)
    with torch.no_grad():
        patched = lm.hf(**base).logits[:, -1]
    for h in handles:
        h.remove()
    clean = lm.hf(**src).logits[:, -1]
    expected = rg.patching.kl(patched, Reference(source_logits=clean)).mean().item()
    assert row["value"] == pytest.approx(expected, abs=1e-6)


def test_memory_budget_chunks_give_the_same_table(lm):
    whole = sweep(lm, DATA, "resid_pre", positions=[-3, -1])
    tiny = sweep(lm, DATA, "resid_pre", positions=[-3, -1], memory_mb=1e-4)
    assert torch.allclose(torch.tensor(whole["value"].values), torch.tensor(tiny["value"].values), atol=1e-6)


@pytest.mark.parametrize("component, positions", [("resid_pre", [-3, -1]), ("head_out", [-1])])
def test_remote_sweep_runs_conditions_as_streams_of_few_traces(component, positions):
    lm = rg.models.tiny("llama")
    traces = []
    handle = lm.hf.model.register_forward_pre_hook(lambda module, args: traces.append(1))   # one per forward
    try:
        here = sweep(lm, DATA, component, positions=positions, progress=False)
        traces.clear()
        there = sweep(lm, DATA, component, positions=positions, remote="local", progress=False)
        assert len(traces) == 1                                 # every condition beside base and source
        traces.clear()
        small = sweep(lm, DATA, component, positions=positions, remote="local", progress=False, memory_mb=0.05)
        assert 1 < len(traces) <= len(here)                     # the memory budget splits them
    finally:
        handle.remove()
    for df in (there, small):
        torch.testing.assert_close(torch.tensor(df["value"].values), torch.tensor(here["value"].values),
                                   atol=1e-5, rtol=0)
        assert df.attrs["base"] == pytest.approx(here.attrs["base"], abs=1e-5)
        assert df.attrs["source"] == pytest.approx(here.attrs["source"], abs=1e-5)
    assert here["value"].nunique() > 1


def test_metrics_and_restoration():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    ref = Reference(torch.tensor([0, 1]), torch.tensor([2, 0]), source_logits=logits)
    assert logit_diff(logits, ref).tolist() == [1.0, 3.0]
    assert rg.patching.prob(logits, ref)[0] == pytest.approx(logits[0].softmax(-1)[0].item())
    assert rg.patching.loss(logits, ref)[1] == pytest.approx(-logits[1].log_softmax(-1)[1].item())
    assert rg.patching.kl(logits, ref).abs().max() < 1e-6
    assert rg.patching.restoration(2.0, base=1.0, source=5.0) == 0.25


def test_table_and_heatmap_label_tokens():
    lm = rg.models.tiny("llama")
    df = sweep(lm, SAME, "resid_pre")
    assert list(df.columns) == ["component", "layer", "position", "token", "head", "metric", "value", "restoration"]
    assert df["token"].tolist()[:6] == ["'a'", "'b'", "' '", "'c'", "' '", "'d'"]
    ax = rg.patching.heatmap(df).axes[0]
    assert ax.get_xticklabels()[3].get_text() == "-3\n'c'"
    assert ax.get_xlabel() == "position (token of base prompt 0)"
    assert len(ax.get_yticklabels()) == lm.arch.n_layers
    heads = rg.patching.heatmap(sweep(lm, SAME, "head_out"), value="value").axes[0]
    assert [t.get_text() for t in heads.get_xticklabels()] == ["h0", "h1", "h2", "h3"]
    assert heads.get_xlabel() == "head"


@pytest.mark.parametrize("bad,message", [
    (dict(component="resid"), "valid components"),
    (dict(layers=[5]), "valid layers 0..1"),
    (dict(component="head_out", heads=[7]), "valid heads 0..3"),
    (dict(heads=[0]), "resid_pre has no heads"),
    (dict(positions=[9]), "valid positions"),
    (dict(positions="all"), "row 0 have 8 and 7 tokens"),
    (dict(metric="acc"), "valid metrics"),
])
def test_bad_sweeps_fail_before_running(bad, message):
    lm = rg.models.tiny("llama")
    calls = []
    handle = lm.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(rg.ReftgraphError, match=message):  # site errors and data errors
            sweep(lm, DATA, **{"component": "resid_pre", **bad})
    finally:
        handle.remove()
    assert not calls


def test_answers_must_be_one_token():
    lm = rg.models.tiny("llama")
    data = Counterfactual(["ab"], ["cd"], correct=["xy"], wrong=["z"])
    with pytest.raises(rg.DataError, match="'xy' of row 0 is 2 tokens"):
        sweep(lm, data)
    with pytest.raises(rg.DataError, match="has 1 rows, the base prompts 2"):
        Counterfactual(["a", "b"], ["c"])


def path_oracle(lm, data, senders, receivers, freeze_mlp=False):
    """Wang et al.'s three passes with plain hooks: (1) head outputs on base and source;
    (2) base run, senders from source, other heads (and MLPs) frozen, receivers' q/k/v kept;
    (3) base run with the receivers' q/k/v from pass 2 (skipped for logits receivers)."""
    fam, cfg = lm.arch.family.name, lm.hf.config
    n_layers, n_heads = lm.arch.n_layers, lm.arch.n_heads
    base, src = (encode(lm.tokenizer, p, "left") for p in (data.base, data.source))
    heads = {(run, layer): capture(lm.hf, fam, "head_out", layer, x, cfg)
             for run, x in (("base", base), ("source", src)) for layer in range(n_layers)}
    mlps = {layer: capture(lm.hf, fam, "mlp_out", layer, base, cfg) for layer in range(n_layers)}
    first = min(layer for layer, _ in senders)
    handles, kept = [], {}
    for layer in range(first, n_layers):
        def edit(t, layer=layer):
            out = t.clone()
            for h in range(n_heads):
                if (layer, h) in senders:
                    out[:, :, h] = heads[("source", layer)][:, :, h]
                elif layer > first:
                    out[:, :, h] = heads[("base", layer)][:, :, h]
            return out
        handles += install(lm.hf, fam, "head_out", layer, edit, cfg)
        if freeze_mlp:
            handles += install(lm.hf, fam, "mlp_out", layer, lambda t, layer=layer: mlps[layer].clone(), cfg)
    for comp, layer, head in receivers:
        handles += install(lm.hf, fam, comp, layer,
                           lambda t, key=(comp, layer, head): kept.setdefault(key, t[:, :, key[2]].clone()) is None or t,
                           cfg)
    with torch.no_grad():
        logits = lm.hf(**base).logits[:, -1]
    for h in handles:
        h.remove()
    if receivers:
        handles = []
        for (comp, layer, head), value in kept.items():
            def put(t, head=head, value=value):
                out = t.clone()
                out[:, :, head] = value
                return out
            handles += install(lm.hf, fam, comp, layer, put, cfg)
        with torch.no_grad():
            logits = lm.hf(**base).logits[:, -1]
        for h in handles:
            h.remove()
    return logit_diff(logits, Reference(*data.answer_ids(lm))).mean().item()


@pytest.mark.parametrize("receivers,freeze", [
    ("logits", "heads"), ("logits", "heads+mlp"), ([("q", 2, 1)], "heads"), ([("q", 2, 1), ("v", 3, 0)], "heads"),
])
def test_path_patching_matches_three_hook_passes(receivers, freeze):
    lm = rg.models.tiny("llama", num_hidden_layers=4, seed=3)
    data = Counterfactual(["ab c d", "xy z w", "an ox"], ["ab d c", "xy w z", "a fox"], correct=["c", "z", "o"],
                          wrong=["d", "w", "x"])
    senders = [(0, 1), (1, 2)]
    sites = "logits" if receivers == "logits" else [rg.Site(c, layer, head=h) for c, layer, h in receivers]
    ours = path_patch(lm, data, senders, sites, freeze=freeze)
    expected = path_oracle(lm, data, senders, [] if receivers == "logits" else receivers, freeze == "heads+mlp")
    assert ours["value"] == pytest.approx(expected, abs=1e-5)
    plain = rg.Graph()  # the senders patched with every path open: a different number
    for layer, head in senders:
        plain.add(rg.Site("head_out", layer, head=head), rg.Patch())
    logits = plain.run(lm, data.base, sources={"source": data.source}).next_token_logits
    assert abs(ours["value"] - logit_diff(logits, Reference(*data.answer_ids(lm))).mean().item()) > 1e-4


def test_path_sweep_batches_streams_like_single_runs():
    lm = rg.models.tiny("gpt2")
    df = path_sweep(lm, SAME, per_forward=3)
    assert len(df) == lm.arch.n_layers * lm.arch.n_heads
    for row in df.iloc[[0, 4, 7]].itertuples():
        assert row.value == pytest.approx(path_patch(lm, SAME, [(row.layer, row.head)])["value"], abs=1e-6)
