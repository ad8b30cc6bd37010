"""Edge scores against the same scores written with plain PyTorch hooks, one prompt at a time:
each sender's write recomputed by hand (a head's through the output projection with the other
heads zeroed), each receiver's input edited through its own copy (tests/oracle.py)."""

import math

import pandas as pd
import pytest
import torch

import reftgraph as rg
from oracle import PATHS, install, module
from reftgraph.methods.edges import rms_scale

DATA = rg.patching.Counterfactual(["ab d c", "xy w z", "jello r"], ["ab c d", "xy z w", "hello q"],
                                  correct=["c", "z", "q"], wrong=["d", "w", "r"])   # source: the clean prompts
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "gemma3_text"])
def lm(request):
    lm = rg.models.tiny(request.param)
    if request.param == "gemma3_text":          # post-norm blocks; norm gains away from 1
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in lm.hf.named_parameters():
                if "norm" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return lm


def root_module(hf, path):
    for part in path.split("."):
        hf = getattr(hf, part)
    return hf


def run_hooked(hf, ids, handles):
    """One forward of ``ids`` with the hooks ``handles`` (removed after, whatever happens)."""
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        for h in handles:
            h.remove()


def writes(lm, family, ids):
    """``{sender: [S, d]}`` what each sender wrote, with plain hooks (no padding)."""
    hf, p, seen = lm.hf, PATHS[family], {}
    n = lm.arch.n_layers
    handles = [root_module(hf, p["embed"]).register_forward_hook(lambda m, a, o: seen.update(input=o[0].detach()))]
    for layer in range(n):
        o_proj = module(hf, family, layer, p["o"])
        mlp = module(hf, family, layer, p.get("mlp_add", p["mlp"]))
        handles.append(o_proj.register_forward_pre_hook(lambda m, a, layer=layer: seen.update({f"z{layer}": a[0][0]})))
        handles.append(mlp.register_forward_hook(
            lambda m, a, o, layer=layer: seen.update({f"m{layer}": (o[0] if isinstance(o, tuple) else o)[0].detach()})))
    run_hooked(hf, ids, handles)
    out = {"input": seen["input"]}
    for layer in range(n):
        o_proj, z = module(hf, family, layer, p["o"]), seen[f"z{layer}"]
        heads = lm.arch.heads("head_out", layer)
        dh = z.shape[-1] // heads
        with torch.no_grad():
            for h in range(heads):
                alone = torch.zeros_like(z)
                alone[:, h * dh:(h + 1) * dh] = z[:, h * dh:(h + 1) * dh]
                out[f"a{layer}.h{h}"] = o_proj(alone) - o_proj(torch.zeros_like(z))
            if "attn_add" in p:     # Gemma 3's norm after attention, (1 + w) o / rms(o): head h's term at o's scale
                norm, o = module(hf, family, layer, p["attn_add"]), o_proj(z)
                scale = (1 + norm.weight) * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps)
                for h in range(heads):
                    out[f"a{layer}.h{h}"] = out[f"a{layer}.h{h}"] * scale
                total = sum(out[f"a{layer}.h{h}"] for h in range(heads))
                torch.testing.assert_close(total, norm(o), atol=1e-5, rtol=1e-5)   # the terms sum to what is added
        out[f"m{layer}"] = seen[f"m{layer}"]
    return out


def shifted(d, head):
    """An edit that adds ``d`` to a receiver's input (head ``head``'s copy, or the whole input)."""
    def edit(t):
        if head is None:
            return t + d
        t = t.clone()
        t[:, :, head] = t[:, :, head] + d
        return t
    return edit


def receiver(name, n_layers):
    """``(component, layer, head)`` of a receiver name."""
    if name == "logits":
        return "logits_in", n_layers - 1, None
    if name.startswith("m"):
        return "mlp_in", int(name[1:]), None
    layer, rest = name[1:].split(".h")
    head, kind = rest[:-3], rest[-2]
    return f"{kind}_in", int(layer), int(head)


def outputs(lm, family, ids):
    """``{(component, layer): [S, d]}``: the embeddings, each attention output and each MLP output (plain hooks)."""
    hf, seen, handles = lm.hf, {}, []
    handles.append(root_module(hf, PATHS[family]["embed"]).register_forward_hook(
        lambda m, a, o: seen.update({("embed", 0): o[0].detach()})))
    for layer in range(lm.arch.n_layers):
        for component in ("attn_out", "mlp_out"):
            def keep(t, key=(component, layer)):
                seen[key] = t[0].detach()
                return t
            handles += install(hf, family, component, layer, keep, hf.config)
    run_hooked(hf, ids, handles)
    return seen


def plain(lm, table, exact: bool, steps: int = 0, on: str = "inputs", data=DATA, per_position=False):
    """The mean over prompts of each edge's score, with plain hooks (one prompt at a time);
    ``steps``: EAP-IG's gradient, averaged over embeddings (``on="inputs"``: k = 0 .. steps - 1)
    or over each sender group's output (``on="activations"``: k = 1 .. steps, one group at a
    time) moved from the corrupted to the clean."""
    family, hf, cfg, tok = lm.arch.family.name, lm.hf, lm.hf.config, lm.tokenizer
    n = lm.arch.n_layers
    width = max(len(tok(p)["input_ids"]) for p in data.source)
    total = torch.zeros(len(table), *((width,) if per_position else ()), dtype=torch.float64)
    for clean, corrupt, good, bad in zip(data.source, data.base, data.correct, data.wrong):
        ids = tok([clean], return_tensors="pt")["input_ids"]
        good_id, bad_id = tok(good)["input_ids"][-1], tok(bad)["input_ids"][-1]
        mine, theirs = writes(lm, family, ids), writes(lm, family, tok([corrupt], return_tensors="pt")["input_ids"])
        delta = {k: theirs[k] - mine[k] for k in mine}

        def metric(logits):
            return logits[0, -1, good_id] - logits[0, -1, bad_id]

        if exact:
            with torch.no_grad():
                base = metric(hf(input_ids=ids).logits)
            for i, (s, r) in enumerate(zip(table.sender, table.receiver)):
                component, layer, head = receiver(r, n)
                handles = install(hf, family, component, layer, shifted(delta[s][None], head), cfg)
                try:
                    with torch.no_grad():
                        total[i] += float(metric(hf(input_ids=ids).logits) - base)
                finally:
                    for h in handles:
                        h.remove()
            continue
        grads = {}
        if not steps:
            moves = [None]
        elif on == "inputs":
            moves = [(("embed", 0), k / steps) for k in range(steps)]
        else:
            clean_out = outputs(lm, family, ids)
            corrupt_out = outputs(lm, family, tok([corrupt], return_tensors="pt")["input_ids"])
            moves = [(key, k / steps) for key in clean_out for k in range(1, steps + 1)]
        for move in moves:
            params, handles = {}, []
            if move is not None and move[0][0] == "embed":
                source, target = (theirs["input"], mine["input"]) if on == "inputs" else (
                    corrupt_out[move[0]], clean_out[move[0]])
                x = source + move[1] * (target - source)
                handles.append(root_module(hf, PATHS[family]["embed"]).register_forward_hook(lambda m, a, o: x[None]))
            elif move is not None:
                (component, layer), alpha = move
                x = corrupt_out[move[0]] + alpha * (clean_out[move[0]] - corrupt_out[move[0]])
                handles += install(hf, family, component, layer, lambda t: x[None].to(t.dtype), cfg)
            for component in ("q_in", "k_in", "v_in", "mlp_in", "logits_in"):
                for layer in ([n - 1] if component == "logits_in" else range(n)):
                    def edit(t, key=(component, layer)):
                        params[key] = torch.zeros_like(t, requires_grad=True)
                        return t + params[key]
                    handles += install(hf, family, component, layer, edit, cfg)
            try:
                value = metric(hf(input_ids=ids).logits)
            finally:
                for h in handles:
                    h.remove()
            keys = list(params)
            for k, g in zip(keys, torch.autograd.grad(value, [params[k] for k in keys], allow_unused=True)):
                g = torch.zeros_like(params[k]) if g is None else g
                grads[k] = grads.get(k, 0) + g / len(moves)
        for i, (s, r) in enumerate(zip(table.sender, table.receiver)):
            component, layer, head = receiver(r, n)
            g = grads[(component, layer)]
            g = g[0] if head is None else g[0, :, head]
            if per_position:
                total[i, :len(g)] += (delta[s] * g).sum(-1).double()
            else:
                total[i] += float((delta[s] * g).sum())
    return total / len(data.source)


def scores_padded(lm, side, **kwargs):
    """``edge_scores`` with the tokenizer padding on ``side``."""
    old, lm.tokenizer.padding_side = lm.tokenizer.padding_side, side
    try:
        return rg.circuits.edge_scores(lm, DATA, progress=False, **kwargs)
    finally:
        lm.tokenizer.padding_side = old


@pytest.mark.parametrize("side", ["left", "right"])
def test_eap_equals_the_plain_hook_linearisation(lm, side):
    table = scores_padded(lm, side)
    want = plain(lm, table, exact=False)
    torch.testing.assert_close(torch.tensor(table.score.values, dtype=torch.float64), want, atol=ATOL, rtol=1e-4)
    assert want.abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_eap_ig_equals_the_plain_hook_average_of_gradients(lm, side):
    table = scores_padded(lm, side, method="eap-ig-inputs", steps=3)
    want = plain(lm, table, exact=False, steps=3)
    torch.testing.assert_close(torch.tensor(table.score.values, dtype=torch.float64), want, atol=ATOL, rtol=1e-4)
    eap = rg.circuits.edge_scores(lm, DATA, progress=False)
    assert not torch.allclose(torch.tensor(eap.score.values, dtype=torch.float64), want, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_eap_ig_on_activations_equals_the_plain_hook_average_of_gradients(lm, side):
    table = scores_padded(lm, side, method="eap-ig-activations", steps=2)
    want = plain(lm, table, exact=False, steps=2, on="activations")
    torch.testing.assert_close(torch.tensor(table.score.values, dtype=torch.float64), want, atol=ATOL, rtol=1e-4)
    inputs = plain(lm, table, exact=False, steps=2)
    assert not torch.allclose(inputs, want, atol=1e-4), "moving every group differs from moving the inputs"


@pytest.mark.parametrize("side", ["left", "right"])
def test_exact_equals_the_plain_hook_edge_patch(lm, side):
    table = rg.circuits.edges(lm)
    sample = pd.concat([table.iloc[::7], table.groupby("receiver_kind").head(1), table.groupby("sender_kind").tail(1)])
    table = sample.drop_duplicates().reset_index(drop=True)    # a sample with every kind of sender and receiver
    old, lm.tokenizer.padding_side = lm.tokenizer.padding_side, side
    try:
        ours = rg.circuits.edge_scores(lm, DATA, method="exact", progress=False)
    finally:
        lm.tokenizer.padding_side = old
    ours = ours.merge(table[["sender", "receiver"]], on=["sender", "receiver"])
    want = plain(lm, ours, exact=True)
    torch.testing.assert_close(torch.tensor(ours.score.values, dtype=torch.float64), want, atol=ATOL, rtol=1e-4)
    assert set(ours.receiver_kind) == {"q", "k", "v", "mlp", "logits"}
    assert set(ours.sender_kind) == {"input", "head", "mlp"}


def test_the_edge_set():
    llama, neox = rg.circuits.edges(rg.models.tiny("llama")), rg.circuits.edges(rg.models.tiny("gpt_neox"))
    assert len(llama) == 82          # see reftgraph.methods.edges: 8 + 5 + 48 + 10 + 11
    same_layer = llama[(llama.sender_layer == llama.receiver_layer)]
    assert set(same_layer.sender_kind) == {"head"} and set(same_layer.receiver_kind) == {"mlp"}
    assert not (neox.sender_layer == neox.receiver_layer).any()      # parallel blocks
    assert (llama.sender_layer < llama.receiver_layer).sum() + len(same_layer) == len(llama)


def test_bad_input_fails_before_any_forward():
    lm = rg.models.tiny("llama")
    with pytest.raises(rg.DataError, match="equal lengths"):
        rg.circuits.edge_scores(lm, rg.patching.Counterfactual(["ab c"], ["ab cd"], correct=["c"], wrong=["d"]))
    with pytest.raises(rg.DataError, match="unknown method"):
        rg.circuits.edge_scores(lm, DATA, method="eap-ig")
    with pytest.raises(rg.DataError, match="steps must be an int"):
        rg.circuits.edge_scores(lm, DATA, method="eap-ig-inputs", steps=0)
    with pytest.raises(rg.DataError, match="does not depend on them"):
        rg.circuits.edge_scores(lm, DATA, metric=lambda logits, ref: torch.zeros(len(logits)))
    biased = rg.models.tiny("gemma3_text", attention_bias=True)
    with torch.no_grad():
        biased.hf.model.layers[1].self_attn.o_proj.bias.fill_(0.1)
    with pytest.raises(rg.SiteError, match=r"layer 1 \(post_attention_layernorm\).*output projection has a bias"):
        rg.circuits.edges(biased)
    with pytest.raises(rg.SiteError, match="LayerNorm.*is not an RMS norm"):
        rms_scale(torch.nn.LayerNorm(8), 8, "layer 0")


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_edge_circuit_with_every_edge_is_the_clean_run_and_with_none_the_corrupted(lm, side):
    table = rg.circuits.edges(lm)
    sources = {"corrupt": DATA.base}
    full = rg.circuits.edge_circuit(lm, table).run(lm, DATA.source, sources=sources, padding_side=side)
    none = rg.circuits.edge_circuit(lm, table.iloc[:0]).run(lm, DATA.source, sources=sources, padding_side=side)
    clean = rg.Graph().run(lm, DATA.source, padding_side=side)
    corrupt = rg.Graph().run(lm, DATA.base, padding_side=side)
    real = clean.attention_mask.bool()
    # (to float rounding: the corrupted rows share the batch)
    torch.testing.assert_close(full.logits[real], clean.logits[real], atol=1e-6, rtol=0)
    assert torch.equal(real, corrupt.attention_mask.bool())      # equal lengths: the same real slots
    torch.testing.assert_close(none.logits[real], corrupt.logits[real], atol=ATOL, rtol=0)


def test_a_circuit_without_one_edge_moves_the_metric_by_its_exact_score(lm):
    """Upstream of one missing edge nothing changes, so its receiver reads the clean stream with
    the sender's corrupted write: exactly what method="exact" runs."""
    exact = rg.circuits.edge_scores(lm, DATA, method="exact", progress=False)
    every = rg.circuits.edges(lm)
    for i in (0, len(every) // 2, len(every) - 1):
        circuit = rg.circuits.edge_circuit(lm, every.drop(index=i))
        result = rg.circuits.edge_faithfulness(circuit, lm, DATA, progress=False)
        assert result["circuit"] - result["full"] == pytest.approx(exact.score[i], abs=ATOL)


def test_mib_curve_and_areas():
    lm = rg.models.tiny("llama")
    scores = rg.circuits.edge_scores(lm, DATA, progress=False)
    result = rg.circuits.mib(lm, DATA, scores, fractions=(0.05, 0.2, 1.0), progress=False, rank="absolute")
    curve = result["curve"]
    assert curve.edges.tolist() == [4, 16, 82]
    assert curve.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-6)      # every edge: the clean run
    f = curve.faithfulness.tolist()          # MIB's areas: over the fractions, linear by default
    want_cpr = 0.15 * (f[0] + f[1]) / 2 + 0.8 * (f[1] + f[2]) / 2
    want_cmd = 0.15 * (abs(1 - f[0]) + abs(1 - f[1])) / 2 + 0.8 * (abs(1 - f[1]) + abs(1 - f[2])) / 2
    assert result["cpr"] == pytest.approx(want_cpr) and result["cmd"] == pytest.approx(want_cmd)
    x = [math.log(0.05), math.log(0.2), 0.0]
    logged = rg.circuits.mib_areas(curve.fraction, f, log_scale=True)
    assert logged == pytest.approx((sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(2)),
                                    sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(2))))
    tiny = rg.circuits.mib(lm, DATA, scores, fractions=(0.001, 1.0), progress=False)["curve"]
    assert tiny.kept.tolist() == [0, 82] and tiny.faithfulness.iloc[0] == pytest.approx(0.0, abs=1e-6)  # int(0.082) = 0
    circuit = rg.circuits.discover_edges(lm, DATA, size=16, table=scores)
    assert set(zip(circuit.kept.sender, circuit.kept.receiver)) == set(
        zip(*[scores.loc[scores.score.abs().sort_values(ascending=False).index[:16], c] for c in ("sender", "receiver")]))
    with pytest.raises(rg.DataError, match="not edges of this model"):
        rg.circuits.edge_circuit(lm, pd.DataFrame({"sender": ["a1.h0"], "receiver": ["a0.h0<q>"]}))
    with pytest.raises(rg.DataError, match="valid sizes"):
        rg.circuits.discover_edges(lm, DATA, size=1000, table=scores)


def test_mib_ranks_cpr_by_signed_effect_and_cmd_by_absolute_score():
    lm = rg.models.tiny("llama")
    scores = rg.circuits.edge_scores(lm, DATA, method="exact", progress=False)
    result = rg.circuits.mib(lm, DATA, scores, fractions=(0.1, 1.0), progress=False)
    clean, corrupted = (rg.Graph().run(lm, prompts).next_token_logits for prompts in (DATA.source, DATA.base))
    ids = DATA.answer_ids(lm)
    diff = [float((x.gather(1, ids[0][:, None]) - x.gather(1, ids[1][:, None])).mean()) for x in (clean, corrupted)]
    assert (scores.attrs["clean"], scores.attrs["corrupted"]) == pytest.approx(diff, abs=1e-6)
    toward = 1.0 if diff[1] >= diff[0] else -1.0         # corrupting a carrying edge moves the metric toward corrupted
    k = int(0.1 * len(scores))
    top = (scores.score * toward).sort_values(ascending=False, kind="stable").index[:k]
    circuit = rg.circuits.edge_circuit(lm, scores.loc[top])
    want = rg.circuits.edge_faithfulness(circuit, lm, DATA, progress=False)["normalised"]
    assert result["cpr_curve"].faithfulness.iloc[0] == pytest.approx(want, abs=1e-6)
    assert result["cpr"] == pytest.approx(0.9 * (want + 1.0) / 2, abs=1e-6)
    absolute = rg.circuits.mib(lm, DATA, scores, fractions=(0.1, 1.0), progress=False, rank="absolute")
    assert absolute["curve"].equals(result["curve"]) and absolute["cmd"] == pytest.approx(result["cmd"])
    assert absolute["cpr"] == pytest.approx(rg.circuits.mib_areas((0.1, 1.0), result["curve"].faithfulness)[0])
    nodes = rg.circuits.scores(lm, DATA, nodes="heads+mlps", progress=False, rank="magnitude")
    torch.testing.assert_close(torch.tensor(rg.circuits.carrying(nodes).values),
                               torch.tensor(rg.circuits.scores(lm, DATA, nodes="heads+mlps", progress=False).score.values))
    with pytest.raises(rg.DataError, match="rank='absolute'"):      # (a table built by hand has no direction)
        rg.circuits.mib(lm, DATA, pd.DataFrame(scores.to_dict()), fractions=(1.0,), progress=False)


def test_node_circuits_as_edges():
    lm = rg.models.tiny("llama")
    every = rg.circuits.scores(lm, DATA, nodes="heads+mlps", progress=False)
    assert len(rg.circuits.node_edges(lm, every)) == len(rg.circuits.edges(lm))       # every node: every edge
    kept = rg.circuits.node_edges(lm, every[every.kind == "mlp"])
    assert set(kept.sender) <= {"input", "m0", "m1"} and set(kept.receiver) <= {"m0", "m1", "logits"}
    result = rg.circuits.mib(lm, DATA, every, fractions=(0.2, 1.0), progress=False)
    assert result["curve"].kept.tolist() == [2, 10] and result["curve"].edges.iloc[-1] == 82
    assert result["curve"].faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("task", ["arithmetic", "mcqa"])
def test_mibs_tasks_line_up_token_for_token_and_score(task):
    data = getattr(rg.datasets, task)(6, seed=3)
    assert len(set(data.correct)) > 1 and all(c != w for c, w in zip(data.correct, data.wrong))
    lm = rg.models.tiny("gpt2")
    for clean, corrupt in zip(data.source, data.base):
        a, b = lm.tokenizer(clean)["input_ids"], lm.tokenizer(corrupt)["input_ids"]
        assert len(a) == len(b)
    # (the tiny models read bytes: " B" is two tokens there, one for SmolLM2; score on the letter)
    data = rg.patching.Counterfactual(data.base, data.source, [c.strip() for c in data.correct],
                                      [w.strip() for w in data.wrong])
    table = rg.circuits.edge_scores(lm, data, progress=False)
    assert table.score.abs().max() > 0


def test_an_edge_circuit_runs_remotely_as_it_runs_here():
    """nnsight's remote="local" simulation ships the circuit's ops (and the writes they share) with the trace."""
    lm = rg.models.tiny("llama")
    circuit = rg.circuits.edge_circuit(lm, rg.circuits.edges(lm).head(20))
    here = circuit.run(lm, DATA.source, sources={"corrupt": DATA.base})
    there = circuit.run(lm, DATA.source, sources={"corrupt": DATA.base}, remote="local")
    torch.testing.assert_close(here.logits, there.logits, atol=0, rtol=0)


def test_an_edge_circuit_saves_as_its_edges_and_loads_for_a_model(tmp_path):
    lm = rg.models.tiny("llama")
    found = rg.circuits.discover_edges(lm, DATA, size=12, progress=False)
    path = found.save(tmp_path / "circuit", model=lm)
    loaded = rg.circuits.load_edge_circuit(path, lm)
    assert loaded.kept[["sender", "receiver"]].values.tolist() == found.kept[["sender", "receiver"]].values.tolist()
    assert loaded.kept.score.tolist() == found.kept.score.tolist() and loaded.settings == found.settings
    sources = {"corrupt": DATA.base}
    want, got = found.run(lm, DATA.source, sources=sources), loaded.run(lm, DATA.source, sources=sources)
    assert torch.equal(want.logits, got.logits)
    found.save(path, model=lm)    # saving again replaces the folder whole
    assert len(rg.circuits.load_edge_circuit(path, lm).kept) == 12
    with pytest.raises(rg.GraphFileError, match="saved for a llama model .* is gpt_neox"):
        rg.circuits.load_edge_circuit(path, rg.models.tiny("gpt_neox"))
    unnamed = found.save(tmp_path / "unnamed")     # saved without a model: the edge count still has to fit
    with pytest.raises(rg.GraphFileError, match="82 edges; tiny-gpt_neox has 102"):
        rg.circuits.load_edge_circuit(unnamed, rg.models.tiny("gpt_neox"))
    with pytest.raises(rg.GraphFileError, match="holds no edge circuit"):
        rg.circuits.load_edge_circuit(tmp_path, lm)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "edge_circuit.json").write_text('{"kept": 3}')
    with pytest.raises(rg.GraphFileError, match="not a saved edge circuit"):
        rg.circuits.load_edge_circuit(tmp_path / "bad", lm)


def plain_mean_writes(lm):
    """Each sender's write averaged over the corrupted prompts' tokens, with plain hooks."""
    family, tok, total, count = lm.arch.family.name, lm.tokenizer, {}, 0
    for prompt in DATA.base:
        w = writes(lm, family, tok([prompt], return_tensors="pt")["input_ids"])
        total = {k: total.get(k, 0) + v.double().sum(0) for k, v in w.items()}
        count += next(iter(w.values())).shape[0]
    return {k: v / count for k, v in total.items()}


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_mean_ablated_edge_gives_its_receiver_the_senders_mean_write(lm, side):
    """Without one edge (mean ablation), its receiver reads the clean stream plus (mean write -
    live write) of the sender: the plain-hook edit of that one receiver, one prompt at a time."""
    family, hf, cfg, tok, n = lm.arch.family.name, lm.hf, lm.hf.config, lm.tokenizer, lm.arch.n_layers
    means = plain_mean_writes(lm)
    every = rg.circuits.edges(lm)
    for i in (0, len(every) // 3, len(every) - 1):
        s, r = every.sender[i], every.receiver[i]
        circuit = rg.circuits.edge_circuit(lm, every.drop(index=i), ablate="mean", data=DATA)
        assert circuit.streams == {"base"}
        got = circuit.run(lm, DATA.source, padding_side=side).next_token_logits
        component, layer, head = receiver(r, n)
        for row, clean in enumerate(DATA.source):
            ids = tok([clean], return_tensors="pt")["input_ids"]
            d = (means[s] - writes(lm, family, ids)[s].double()).float()[None]
            handles = install(hf, family, component, layer, shifted(d, head), cfg)
            try:
                with torch.no_grad():
                    want = hf(input_ids=ids).logits[0, -1]
            finally:
                for h in handles:
                    h.remove()
            torch.testing.assert_close(got[row], want, atol=ATOL, rtol=0)


def test_mean_ablated_circuits_run_without_the_corrupted_stream_and_save_their_means(tmp_path):
    lm = rg.models.tiny("llama")
    table = rg.circuits.edges(lm)
    full = rg.circuits.edge_circuit(lm, table, ablate="mean", data=DATA)
    result = rg.circuits.edge_faithfulness(full, lm, DATA, progress=False)
    assert result["circuit"] == pytest.approx(result["full"], abs=1e-5) and result["normalised"] == pytest.approx(1.0)
    none = rg.circuits.edge_circuit(lm, table.iloc[:0], ablate="mean", data=DATA)
    empty = rg.circuits.edge_faithfulness(none, lm, DATA, progress=False)
    corrupt = rg.circuits.edge_faithfulness(rg.circuits.edge_circuit(lm, table.iloc[:0]), lm, DATA, progress=False)
    assert empty["normalised"] == pytest.approx(0.0, abs=1e-6) and empty["empty"] != pytest.approx(corrupt["empty"])
    found = rg.circuits.discover(lm, DATA, size=10, level="edge", ablate="mean", progress=False)
    assert found.settings["ablate"] == "mean" and found.means is not None
    loaded = rg.circuits.load_edge_circuit(found.save(tmp_path / "c", model=lm), lm)
    assert set(loaded.means) == set(found.means)
    assert torch.equal(loaded.run(lm, DATA.source).logits, found.run(lm, DATA.source).logits)
    curve = rg.circuits.mib(lm, DATA, rg.circuits.edge_scores(lm, DATA, progress=False), fractions=(0.1, 1.0),
                            ablate="mean", progress=False)["curve"]
    assert curve.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(rg.DataError, match="needs data"):
        rg.circuits.edge_circuit(lm, table, ablate="mean")
    with pytest.raises(rg.DataError, match="ablate must be"):
        rg.circuits.edge_circuit(lm, table, ablate="zero")


EQUAL = rg.patching.Counterfactual(["ab d c", "xy w z"], ["ab c d", "xy z w"], correct=["c", "z"], wrong=["d", "w"])


def test_per_position_eap_equals_the_plain_hook_linearisation_at_each_token(lm):
    table = rg.circuits.edge_scores(lm, EQUAL, progress=False, per_position=True)
    edges = table.drop_duplicates(["sender", "receiver"]).reset_index(drop=True)
    want = plain(lm, edges, exact=False, data=EQUAL, per_position=True)          # [edges, positions]
    ours = torch.tensor(table.score.values, dtype=torch.float64).view(len(edges), -1)
    assert table.position.tolist()[:ours.shape[1]] == list(range(ours.shape[1]))
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=1e-4)
    whole = rg.circuits.edge_scores(lm, EQUAL, progress=False)
    torch.testing.assert_close(ours.sum(1), torch.tensor(whole.score.values, dtype=torch.float64), atol=ATOL, rtol=1e-4)
    assert (want.abs() > 1e-3).sum(1).gt(1).any(), "some edge matters at more than one token"


def test_per_position_scores_need_a_gradient_method_and_one_length():
    lm = rg.models.tiny("llama")
    with pytest.raises(rg.DataError, match="per_position=True needs a gradient method"):
        rg.circuits.edge_scores(lm, EQUAL, method="exact", per_position=True, progress=False)
    with pytest.raises(rg.DataError, match=r"prompts of \[6, 7\] tokens"):
        rg.circuits.edge_scores(lm, DATA, per_position=True, progress=False)


def plain_pair(lm, sender, receiver_name, position, data):
    """The metric's mean change when ``receiver_name`` reads ``sender``'s corrupted write at token
    ``position`` alone (plain hooks, one prompt at a time)."""
    family, hf, cfg, tok = lm.arch.family.name, lm.hf, lm.hf.config, lm.tokenizer
    total = 0.0
    for clean, corrupt, good, bad in zip(data.source, data.base, data.correct, data.wrong):
        ids = tok([clean], return_tensors="pt")["input_ids"]
        good_id, bad_id = tok(good)["input_ids"][-1], tok(bad)["input_ids"][-1]
        d = writes(lm, family, tok([corrupt], return_tensors="pt")["input_ids"])[sender] - writes(lm, family, ids)[sender]
        at = torch.zeros_like(d)
        at[position] = d[position]
        component, layer, head = receiver(receiver_name, lm.arch.n_layers)
        with torch.no_grad():
            base = hf(input_ids=ids).logits
        handles = install(hf, family, component, layer, shifted(at[None], head), cfg)
        try:
            with torch.no_grad():
                moved = hf(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
        total += float((moved[0, -1, good_id] - moved[0, -1, bad_id]) - (base[0, -1, good_id] - base[0, -1, bad_id]))
    return total / len(data.source)


def test_a_per_position_circuit_without_one_pair_moves_the_metric_as_that_patch(lm):
    scores = rg.circuits.edge_scores(lm, EQUAL, progress=False, per_position=True)
    tokens = int(scores.position.max()) + 1
    every = scores.drop(columns="score")
    full = rg.circuits.edge_circuit(lm, every, {"positions": tokens})
    none = rg.circuits.edge_circuit(lm, every.iloc[:0], {"positions": tokens})
    ran = {name: rg.circuits.edge_faithfulness(c, lm, EQUAL, progress=False) for name, c in (("full", full),
                                                                                              ("none", none))}
    assert ran["full"]["circuit"] == pytest.approx(ran["full"]["full"], abs=ATOL)      # every pair: the clean run
    assert ran["none"]["circuit"] == pytest.approx(ran["none"]["empty"], abs=ATOL)     # none: the corrupted run
    top = scores.reindex(scores.score.abs().sort_values(ascending=False).index).index[:2]
    for i in list(top) + [len(every) // 3]:
        s, r, p = every.sender[i], every.receiver[i], int(every.position[i])
        result = rg.circuits.edge_faithfulness(rg.circuits.edge_circuit(lm, every.drop(index=i), {"positions": tokens}),
                                               lm, EQUAL, progress=False)
        assert result["circuit"] - result["full"] == pytest.approx(plain_pair(lm, s, r, p, EQUAL), abs=ATOL)


def test_per_position_circuits_are_discovered_saved_and_refuse_other_lengths(tmp_path):
    lm = rg.models.tiny("llama")
    circuit = rg.circuits.discover(lm, EQUAL, level="edge", size=20, per_position=True, progress=False)
    assert len(circuit.kept) == 20 and circuit.total == 82 * 6 and circuit.settings["positions"] == 6
    assert "(edge, token) pairs" in repr(circuit)
    again = rg.circuits.load_edge_circuit(circuit.save(tmp_path / "c", model=lm), lm)
    assert again.kept[["sender", "receiver", "position"]].values.tolist() == \
        circuit.kept[["sender", "receiver", "position"]].values.tolist()
    longer = rg.patching.Counterfactual(["ab dd c"], ["ab cc d"], correct=["c"], wrong=["d"])
    with pytest.raises(rg.DataError, match="prompts of 6 tokens; these prompts have 7"):
        rg.circuits.edge_faithfulness(circuit, lm, longer, progress=False)


def test_mib_takes_per_position_scores():
    lm = rg.models.tiny("llama")
    scores = rg.circuits.edge_scores(lm, EQUAL, progress=False, per_position=True)
    result = rg.circuits.mib(lm, EQUAL, scores, fractions=(0.05, 1.0), progress=False)
    assert result["curve"].edges.tolist() == [int(0.05 * 82 * 6), 82 * 6]
    assert result["curve"].faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-5)   # (float rounding: twice the rows)
