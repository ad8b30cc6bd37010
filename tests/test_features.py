"""Ops in a dictionary's basis (``basis=sae``) against the same math in plain hooks.

Every op x activation (ReLU, JumpReLU, TopK) x padding side, outputs and gradients: the
oracle encodes each selected slot by hand, edits its features and writes the change back
along their decoder directions, keeping the reconstruction error."""

import json

import pytest
import torch
from safetensors import safe_open

import reftgraph as rg
from oracle import capture, encode, positions_of, real_positions, run_with
from test_oracle import BASE, SOURCE, compare_logits, derangement, new_value

OPS = ("patch", "add", "set", "zero", "mean", "resample", "collect")
KINDS = {"relu": {}, "jumprelu": {"scale": 2.0}, "topk": {"k": 5, "apply_b_dec_to_input": True}}
IDS = (3, 10, 17, 40)
ATOL = 1e-5


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def dictionary(activation, d_in=32, seed=0):
    """A random dictionary in which three of the features ``IDS`` fire on most tokens."""
    sae = rg.Dictionary(d_in, 64, activation=activation, seed=seed, **KINDS[activation])
    sae.b_enc[list(IDS[:3])] = 0.5
    return sae


def hand_features(sae, x):
    """The dictionary's encoder written out: ``act((scale x - b_dec?) W_enc + b_enc)``."""
    x = x.float() * sae.scale
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc + sae.b_enc
    if sae.activation == "relu":
        return pre.clamp(min=0)
    if sae.activation == "jumprelu":
        return torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
    top = pre.sort(dim=-1, descending=True).indices[..., :sae.k]      # each token's k largest
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, top, True)
    return torch.where(keep, pre.clamp(min=0), torch.zeros_like(pre))


def op_for(kind, n, basis):
    g = torch.Generator().manual_seed(0)
    if kind == "patch":
        return rg.Patch("source", basis=basis)
    if kind == "add":
        return rg.Add(torch.rand(n, generator=g) + 0.5, scale=2.0, trainable=True, basis=basis)
    if kind == "set":
        return rg.Set(torch.rand(n, generator=g), trainable=True, basis=basis)
    if kind == "collect":
        return rg.Collect(basis=basis)
    return rg.Ablate(kind, seed=3, basis=basis)


def feature_edit(kind, op, sae, ids, selector, base_mask, src, src_mask):
    """An ``edit(t)`` of the residual stream, slot by slot, in feature space."""
    base_real, src_real = real_positions(base_mask), real_positions(src_mask)

    def feats(x):
        return hand_features(sae, x)[..., ids]

    def edit(t):
        slots = [(b, j, base_real[b][r]) for b in range(t.shape[0])
                 for j, r in enumerate(positions_of(selector, len(base_real[b])))]
        perm = derangement(t.shape[0], 3) if kind == "resample" else None
        mean = torch.stack([feats(t[b, p]) for b, _, p in slots]).mean(0) if kind == "mean" else None
        out = t.clone()
        for b, j, p in slots:
            cur = feats(t[b, p])
            new = new_value(kind, op, cur, mean, lambda: feats(src[b, src_real[b][positions_of(selector, len(
                src_real[b]))[j]]]), lambda: feats(t[perm[b], base_real[perm[b]][positions_of(
                    selector, len(base_real[perm[b]]))[j]]]))
            out[b, p] = t[b, p] + (new - cur) @ sae.W_dec[ids] / sae.scale
        return out

    return edit


def same_outputs_and_gradients(lm, g, out, ref, base_in):
    """The run ``out`` of graph ``g`` has the plain-hook logits ``ref`` (which differ from the
    model's own), and the same gradients for every parameter of ``g``."""
    base_mask = out.attention_mask[out.rows["base"]]
    compare_logits(out.logits, base_mask, ref, base_in["attention_mask"], ATOL)
    assert not torch.allclose(ref, lm.hf(**base_in).logits, atol=1e-6)   # the edit shows
    params = list(g.parameters())
    if params:
        w = torch.randn(out.logits.shape[-1], generator=torch.Generator().manual_seed(1))

        def loss(logits, mask):
            return sum((logits[b, r] * w).sum() for b, r in enumerate(real_positions(mask)))

        ours = torch.autograd.grad(loss(out.logits, base_mask), params)
        theirs = torch.autograd.grad(loss(ref, base_in["attention_mask"]), params)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("activation", KINDS)
def test_ops_in_a_dictionary_basis(lm, activation, kind, side):
    sae = dictionary(activation)
    selector = "f2+l2" if kind == "resample" else [0, -1]
    ids = list(IDS)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions=selector, subspace=IDS), op_for(kind, len(ids), sae), name="n")
    out = g.run(lm, BASE, sources={"source": SOURCE} if kind == "patch" else None, padding_side=side)
    cfg, base_in, src_in = lm.hf.config, encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    if kind == "collect":
        clean = capture(lm.hf, "llama", "resid_post", 1, base_in, cfg)
        for b, real in enumerate(real_positions(base_in["attention_mask"])):
            want = hand_features(sae, clean[b, [real[r] for r in positions_of(selector, len(real))]])[..., ids]
            torch.testing.assert_close(out["n"][b], want, atol=ATOL, rtol=0)
        return
    src = capture(lm.hf, "llama", "resid_post", 1, src_in, cfg)
    edit = feature_edit(kind, g["n"].op, sae, ids, selector, base_in["attention_mask"], src, src_in["attention_mask"])
    ref = run_with(lm.hf, "llama", "resid_post", 1, base_in, edit, cfg)
    same_outputs_and_gradients(lm, g, out, ref, base_in)


@pytest.mark.parametrize("activation", KINDS)
def test_an_identity_edit_leaves_the_logits_bit_identical(lm, activation):
    sae = dictionary(activation)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1), rg.Add(torch.zeros(64), basis=sae), name="same")
    g.add(rg.Site("mlp_out", layer=0, subspace=(1, 2)), rg.Set(torch.zeros(2), basis=dictionary(activation, seed=1),
                                                               mask=torch.zeros(2)), name="masked")
    torch.testing.assert_close(g.run(lm, BASE).logits, rg.Graph().run(lm, BASE).logits, atol=0, rtol=0)


def test_the_dictionary_as_an_op_splices_its_reconstruction_in(lm):
    sae = dictionary("topk")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1), sae, name="splice")
    cfg, inputs = lm.hf.config, encode(lm.tokenizer, BASE, "right")
    ref = run_with(lm.hf, "llama", "resid_post", 1, inputs, lambda t: (hand_features(sae, t) @ sae.W_dec + sae.b_dec)
                   / sae.scale, cfg)
    out = g.run(lm, BASE)
    compare_logits(out.logits, out.attention_mask, ref, inputs["attention_mask"], ATOL)


def test_a_graph_in_a_dictionary_basis_saves_and_loads(lm, tmp_path):
    sae = dictionary("jumprelu")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, subspace=(5,)), rg.Add(torch.ones(1), scale=3.0, basis=sae), name="steer")
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(basis=sae), name="f")
    back = rg.load_graph(rg.save(g, tmp_path / "g"))
    assert torch.equal(back["steer"].op.basis.threshold, sae.threshold)
    a, b = g.run(lm, BASE), back.run(lm, BASE)
    assert torch.equal(a.logits, b.logits) and torch.equal(a["f"], b["f"])


def shared_basis_graph(sae):
    """Three nodes in one dictionary's basis (as a per-position feature circuit has), and one without."""
    g = rg.Graph()
    for p in range(3):
        g.add(rg.Site("resid_post", layer=1, positions=[p], subspace=(p, 7)), rg.Ablate("zero", basis=sae), name=f"z{p}")
    g.add(rg.Site("resid_post", layer=0), rg.Add(torch.ones(32), scale=0.1), name="steer")
    return g


def test_a_dictionary_several_nodes_share_is_saved_once(lm, tmp_path):
    sae = dictionary("topk")
    g = shared_basis_graph(sae)
    folder = rg.files.current_folder(rg.save(g, tmp_path / "g"))
    spec = json.loads((folder / "graph.json").read_text())
    with safe_open(str(folder / "weights.safetensors"), "pt") as f:
        stored = sorted(f.keys())
    names = sorted(sae.state_dict())
    assert stored == [f"op0.basis.{n}" for n in names] + ["op3.vector"]          # the dictionary once
    assert spec["version"] == 2 and spec["shared"] == {f"op{i}.basis.{n}": f"op0.basis.{n}" for i in (1, 2)
                                                       for n in names}
    back = rg.load_graph(folder)
    assert back["z1"].op.basis is back["z0"].op.basis is back["z2"].op.basis     # one module again
    assert torch.equal(g.run(lm, BASE).logits, back.run(lm, BASE).logits)
    other = shared_basis_graph(dictionary("topk", seed=5))
    rg.files.load_weights(other, rg.files.io.graph_state(g)[1])
    assert torch.equal(other["z2"].op.basis.W_enc, sae.W_enc)
    copies = rg.Graph([g.nodes[0], rg.Node("z9", g.nodes[1].site, rg.Ablate("zero", basis=dictionary("topk")))])
    assert "shared" not in rg.files.io.graph_state(copies)[0]          # equal values, two modules: two copies

    def crafted(change):
        out = tmp_path / f"crafted{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "graph.json").write_text(json.dumps(change(json.loads((folder / "graph.json").read_text()))))
        (out / "weights.safetensors").write_bytes((folder / "weights.safetensors").read_bytes())
        return out
    for change, message in [(lambda s: {**s, "version": 1}, "exactly the keys"),
                            (lambda s: {**s, "shared": {**s["shared"], "op1.basis.W_enc": "op9.x"}}, "which is not a"),
                            (lambda s: {**s, "shared": {**s["shared"], "op0.basis.W_enc": "op0.basis.W_dec"}},
                             "stored in weights.safetensors too"),
                            (lambda s: {**s, "shared": []}, "'shared' must be a mapping")]:
        with pytest.raises(rg.GraphFileError, match=message):
            rg.load_graph(crafted(change))


def bad(lm, op, site=rg.Site("resid_post", layer=1)):
    g = rg.Graph()
    g.add(site, op, name="n")
    with pytest.raises(rg.SiteError) as e:
        g.run(lm, BASE)
    return str(e.value)


def test_bad_input_is_refused_before_any_forward(lm):
    sae = rg.Dictionary(32, 64, name="res1", trained_at="resid_post[1]")
    assert "feature id 64 out of range; dictionary 'res1' has 64 features: valid ids 0..63" in bad(
        lm, rg.Ablate(basis=sae), rg.Site("resid_post", layer=1, subspace=(2, 64)))
    assert "dictionary 'wide' reads width 48; resid_post has width 32" in bad(
        lm, rg.Collect(basis=rg.Dictionary(48, 64, name="wide")))
    assert "trained at resid_post[1], not at resid_post[0]; set strict=False" in bad(
        lm, rg.Collect(basis=sae), rg.Site("resid_post", layer=0))
    assert "Add has width 3, the features it edits need 2 (the subspace's feature ids)" in bad(
        lm, rg.Add(torch.ones(3), basis=sae), rg.Site("resid_post", layer=-1, subspace=(0, 1)))
    with pytest.raises(ValueError, match="basis must be a reftgraph.Dictionary"):
        rg.Collect(basis=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="a topk dictionary needs k in 1..64"):
        rg.Dictionary(32, 64, activation="topk")
    loose = rg.Dictionary(32, 64, trained_at="resid_post[1]", strict=False)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0), rg.Collect(basis=loose), name="n")
    with pytest.warns(UserWarning, match="trained at resid_post"):
        g.run(lm, BASE)


# -- the methods: activations, explain, ReFT in features, attribution, circuits ------------

DATA = rg.patching.Counterfactual(["the cat sat on", "a dog ran to"], ["the cow sat on", "a hen ran to"],
                                  correct=["a", "b"], wrong=["c", "d"])   # base = corrupted, source = clean


def test_activations_are_the_collected_features(lm):
    sae = dictionary("topk")
    prompts = ["the cat sat", "a dog"]
    table = rg.features.activations(lm, prompts, rg.Site("resid_post", 1), sae, progress=False)
    g = rg.Graph()
    g.add(rg.Site("resid_post", 1), rg.Collect(basis=sae), name="f")
    out = g.run(lm, prompts)
    for _, r in table.iterrows():
        assert out["f"][r.row, r.position, r.feature].item() == pytest.approx(r.activation)
    assert len(table) == int((out["f"] * out.valid["f"][..., None] != 0).sum())
    ids = lm.tokenizer(prompts[0])["input_ids"]
    first = table[(table.row == 0) & (table.position == 1)]
    assert set(first.token) == {lm.tokenizer.decode([ids[1]])}
    top = rg.features.top_contexts(lm, prompts, rg.Site("resid_post", 1), sae, features=list(IDS[:3]), k=2,
                                   progress=False)
    assert top.groupby("feature").size().max() == 2
    for feature, rows in top.groupby("feature"):
        best = table[table.feature == feature].activation.nlargest(2).tolist()
        assert rows.activation.tolist() == pytest.approx(best)
        assert all("«" in c and "»" in c for c in rows.context)


def test_explain_finds_the_features_a_reft_writes_along():
    sae = dictionary("relu")
    op = rg.features.reft(sae, [5, 9, 30], rank=3, seed=0)
    table = rg.features.explain(op, sae, top=3)
    assert sorted(table.feature) == [5, 9, 30] and table.cosine.min() > 0.999
    free = rg.LoReFT(width=32, rank=4, seed=1)
    table = rg.features.explain(free, sae, top=64)
    dec = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    R = free.R().detach()
    proj = dec @ torch.linalg.pinv(R) @ R            # projection on the row space, by least squares
    want = proj.norm(dim=-1)
    torch.testing.assert_close(torch.tensor(table.cosine.tolist()), want[table.feature.tolist()], atol=1e-5, rtol=0)
    g = rg.Graph()
    g.add(rg.Site("resid_post", 1, subspace=(0,)), free, name="r")
    one = rg.features.explain(g["r"], sae, top=64)       # the node's subspace: row 0 of R alone
    torch.testing.assert_close(torch.tensor(one.cosine.tolist()), (dec @ R[0] / R[0].norm()).abs()[one.feature.tolist()],
                               atol=1e-5, rtol=0)
    with pytest.raises(rg.DataError, match="decodes to width 32"):
        rg.features.explain(rg.LoReFT(width=16, rank=2), sae)


def test_a_reft_in_features_trains_and_stays_in_their_span(lm):
    sae = dictionary("relu")
    op = rg.features.reft(sae, [3, 10, 17], rank=2, seed=0)
    g = rg.Graph()
    g.add(rg.Site("resid_post", 1, positions="last"), op, name="r")
    opt = torch.optim.SGD(g.parameters(), lr=0.5)
    loss = g.run(lm, ["abc"]).next_token_logits[0, 7]
    loss.backward()
    opt.step()
    assert op.rotate.grad is not None and "within" not in dict(op.named_parameters())
    D = sae.W_dec[[3, 10, 17]]
    R = op.R().detach()
    torch.testing.assert_close(R @ torch.linalg.pinv(D) @ D, R, atol=1e-5, rtol=0)


def hand_attribution(lm, sae, layer, steps=None, data=DATA, per_position=False):
    """AtP (or IG with ``steps``) written with plain hooks: features and error at resid_post[layer]
    (summed over positions, or per position), averaged over the rows, and their |row values|
    averaged over the rows."""
    cfg, side = lm.hf.config, "right"
    clean_in, corrupt_in = encode(lm.tokenizer, data.source, side), encode(lm.tokenizer, data.base, side)
    h0 = capture(lm.hf, "llama", "resid_post", layer, clean_in, cfg)
    h1 = capture(lm.hf, "llama", "resid_post", layer, corrupt_in, cfg)
    mask = clean_in["attention_mask"][..., None].float()
    last = clean_in["attention_mask"].sum(1) - 1
    ids = [lm.tokenizer(a)["input_ids"][-1] for a in data.correct], [lm.tokenizer(a)["input_ids"][-1] for a in data.wrong]

    def grad_at(alpha):
        leaf = {}

        def edit(t):
            leaf["h"] = (h0 + alpha * (h1 - h0)).where(mask.bool(), t).detach().requires_grad_(True)
            return leaf["h"]
        logits = run_with(lm.hf, "llama", "resid_post", layer, clean_in, edit, cfg)
        nxt = logits[torch.arange(2), last]
        metric = (nxt[torch.arange(2), ids[0]] - nxt[torch.arange(2), ids[1]]).sum()
        return torch.autograd.grad(metric, leaf["h"])[0]

    alphas = [0.0] if steps is None else [(k + 0.5) / steps for k in range(steps)]
    g_h = sum(grad_at(a) for a in alphas) / len(alphas)
    f0, f1 = hand_features(sae, h0), hand_features(sae, h1)
    g_f = g_h @ sae.W_dec.T                          # h + (f' - f) W_dec: dM/df' = dM/dh W_dec^T
    error = lambda h: h - (hand_features(sae, h) @ sae.W_dec + sae.b_dec)   # noqa: E731
    features = (f1 - f0) * g_f * mask                                       # [rows, tokens, 64]
    err = ((error(h1) - error(h0)) * g_h * mask).sum(-1)                    # [rows, tokens]
    if not per_position:
        features, err = features.sum(1), err.sum(1)
    return features.mean(0), err.mean(0), features.abs().mean(0), err.abs().mean(0)


@pytest.mark.parametrize("method", ["atp", "ig"])
@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_feature_attribution_equals_the_plain_hook_linearisation(lm, activation, method):
    sae = dictionary(activation)
    table = rg.features.attribute(lm, DATA, {rg.Site("resid_post", 0): sae}, method=method, steps=3, progress=False)
    features, err, features_abs, err_abs = hand_attribution(lm, sae, 0, steps=3 if method == "ig" else None)
    torch.testing.assert_close(torch.tensor(table.estimate[:64].tolist()), features.float(), atol=1e-5, rtol=1e-4)
    assert table.feature.iloc[-1] == -1 and table.estimate.iloc[-1] == pytest.approx(float(err), abs=1e-5)
    torch.testing.assert_close(torch.tensor(table.mean_abs[:64].tolist()), features_abs.float(), atol=1e-5, rtol=1e-4)
    assert table.mean_abs.iloc[-1] == pytest.approx(float(err_abs), abs=1e-5)
    assert (table.mean_abs > table.estimate.abs() + 1e-6).any()        # some features differ in sign row by row
    assert table.attrs["method"] == ("AtP" if method == "atp" else "IG3")


def test_feature_circuits_run_as_graphs(lm):
    sae = dictionary("topk")
    sites = {rg.Site("resid_post", 0): sae}
    everything = __import__("pandas").DataFrame({"site": "resid_post[0]", "feature": range(64)})
    full = rg.features.circuit_graph(lm, DATA, sites, everything)
    assert len(full) == 0                                           # nothing outside: the clean model
    nothing = rg.features.circuit_graph(lm, DATA, sites, everything.iloc[:0], errors="ablate")
    out = nothing.run(lm, DATA.source, sources={"corrupt": DATA.base})
    corrupt = rg.Graph().run(lm, DATA.base)
    compare_logits(out.logits, out.attention_mask[out.rows["base"]], corrupt.logits, corrupt.attention_mask, 1e-4)
    errors_only = rg.features.circuit_graph(lm, DATA, sites, everything, errors="ablate")
    assert errors_only["outside_resid_post0"].op.features is False
    result = rg.features.faithfulness(nothing, lm, DATA, progress=False)
    assert result["faithfulness"] == pytest.approx(0.0, abs=1e-6) and result["size"] == 0
    found = rg.features.discover(lm, DATA, sites, size=3, progress=False)
    assert len(found.kept) == 3 and found.kept.score.is_monotonic_decreasing
    assert found.nodes[0].site.subspace == tuple(sorted(set(range(64)) - set(found.kept.feature)))
    table = rg.features.attribute(lm, DATA, sites, progress=False)
    by_rows = rg.features.discover(lm, DATA, sites, size=3, table=table, rank="mean_abs", progress=False)
    assert by_rows.kept.feature.tolist() == table[:64].nlargest(3, "mean_abs").feature.tolist()
    with pytest.raises(rg.DataError, match="mean_abs column"):
        rg.features.discover(lm, DATA, sites, size=3, table=table.drop(columns="mean_abs"), rank="mean_abs")
    mean = rg.features.discover(lm, DATA, sites, size=0.05, ablate="mean", progress=False)
    assert isinstance(mean.nodes[0].op, rg.Ablate)
    via = rg.circuits.discover(lm, DATA, level="feature", dictionaries=sites, size=3, progress=False)
    assert via.kept.feature.tolist() == found.kept.feature.tolist()
    with pytest.raises(rg.DataError, match="equal length"):
        rg.features.attribute(lm, rg.patching.Counterfactual(["a b c"], ["a"], ["a"], ["b"]), sites, progress=False)


ONE_LENGTH = rg.patching.Counterfactual(["the cat sat on", "the dog ran to"], ["the cow sat on", "the hen ran to"],
                                        correct=["a", "b"], wrong=["c", "d"])


def test_per_position_feature_attribution_equals_the_plain_hook_linearisation(lm):
    sae = dictionary("topk")
    table = rg.features.attribute(lm, ONE_LENGTH, {rg.Site("resid_post", 0): sae}, progress=False, per_position=True)
    features, err, features_abs, err_abs = hand_attribution(lm, sae, 0, data=ONE_LENGTH, per_position=True)
    width = features.shape[0]                                              # features [S, 64], err [S]
    assert table.position.tolist() == [p for p in range(width) for _ in range(65)]
    got = torch.tensor(table.estimate.tolist()).view(width, 65)
    torch.testing.assert_close(got[:, :64], features.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, 64], err.float(), atol=1e-5, rtol=1e-4)
    got_abs = torch.tensor(table.mean_abs.tolist()).view(width, 65)
    torch.testing.assert_close(got_abs, torch.cat([features_abs, err_abs[:, None]], 1).float(), atol=1e-5, rtol=1e-4)
    whole = rg.features.attribute(lm, ONE_LENGTH, {rg.Site("resid_post", 0): sae}, progress=False)
    torch.testing.assert_close(got.sum(0), torch.tensor(whole.estimate.tolist()), atol=1e-5, rtol=1e-4)
    with pytest.raises(rg.DataError, match="prompts of one length"):
        rg.features.attribute(lm, DATA, {rg.Site("resid_post", 0): sae}, progress=False, per_position=True)


def test_a_per_position_feature_circuit_equals_plain_hooks(lm):
    """Each position keeps its own features; the others take their corrupted values there, the
    error stays: ``h + sum over outside features (f_corrupt - f_clean) W_dec``, per position."""
    sae = dictionary("topk")
    layer, sites = 0, {rg.Site("resid_post", 0): sae}
    found = rg.features.discover(lm, ONE_LENGTH, sites, size=0.05, progress=False, per_position=True)
    width = found.settings["positions"]
    assert len(found.kept) == round(0.05 * 64 * width) and {"position", "feature"} <= set(found.kept)
    assert len(found.kept.position.unique()) > 1, "the circuit keeps features at more than one position"
    out = found.run(lm, ONE_LENGTH.source, sources={"corrupt": ONE_LENGTH.base})

    cfg = lm.hf.config
    clean_in, corrupt_in = (encode(lm.tokenizer, p, "right") for p in (ONE_LENGTH.source, ONE_LENGTH.base))
    h1 = capture(lm.hf, "llama", "resid_post", layer, corrupt_in, cfg)

    def edit(h):
        f0, f1 = hand_features(sae, h), hand_features(sae, h1)
        moved = h.clone()
        for p in range(width):
            inside = set(found.kept.loc[found.kept.position == p, "feature"])
            outside = [i for i in range(64) if i not in inside]
            moved[:, p] = h[:, p] + (f1[:, p, outside] - f0[:, p, outside]) @ sae.W_dec[outside]
        return moved
    want = run_with(lm.hf, "llama", "resid_post", layer, clean_in, edit, cfg)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-4)
    # mean-ablated: the features outside take their mean over the corrupted rows at that position
    mean = rg.features.circuit_graph(lm, ONE_LENGTH, sites, found.kept, ablate="mean", positions=width)
    means = hand_features(sae, h1).mean(0)                                             # [S, 64]

    def to_means(h):
        f0, moved = hand_features(sae, h), h.clone()
        for p in range(width):
            outside = [i for i in range(64) if i not in set(found.kept.loc[found.kept.position == p, "feature"])]
            moved[:, p] = h[:, p] + (means[p, outside] - f0[:, p, outside]) @ sae.W_dec[outside]
        return moved
    torch.testing.assert_close(mean.run(lm, ONE_LENGTH.source).logits,
                               run_with(lm.hf, "llama", "resid_post", layer, clean_in, to_means, cfg),
                               atol=1e-5, rtol=1e-4)
    every = found.kept.iloc[:0]
    assert rg.features.faithfulness(found, lm, ONE_LENGTH, progress=False)["size"] == len(found.kept)
    assert "positions" in repr(found)
    table = rg.features.attribute(lm, ONE_LENGTH, sites, progress=False, per_position=True)
    largest = rg.features.discover(lm, ONE_LENGTH, sites, size=10, rank="magnitude", table=table, progress=False)
    units = table[table.feature >= 0]
    assert sorted(largest.kept.estimate.abs()) == sorted(units.estimate.abs().nlargest(10))
    with pytest.raises(rg.DataError, match="rank must be"):
        rg.features.discover(lm, ONE_LENGTH, sites, size=10, rank="abs", table=table, progress=False)
    with pytest.raises(rg.DataError, match="pass positions="):
        rg.features.circuit_graph(lm, ONE_LENGTH, sites, found.kept)
    assert len(rg.features.circuit_graph(lm, ONE_LENGTH, sites, every, positions=width)) == width


# -- transcoders: read the MLP's own input, write at mlp_out ------------------------------------

def transcoder(activation):
    tc = rg.Dictionary(32, 64, d_out=32, reads="mlp", activation=activation, seed=2,
                       **{k: v for k, v in KINDS[activation].items() if k != "apply_b_dec_to_input"})
    tc.b_enc[list(IDS[:3])] = 0.5
    return tc


def mlp_run(lm, inputs, edit):
    """Logits with ``edit(mlp_input, mlp_output) -> new output`` applied to layer 1's MLP (plain hooks)."""
    mlp = lm.hf.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: edit(args[0], out))
    try:
        return lm.hf(**inputs).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["add", "set", "zero", "mean", "resample", "collect", "splice"])
@pytest.mark.parametrize("activation", KINDS)
def test_transcoders_in_plain_hooks(lm, activation, kind, side):
    tc = transcoder(activation)
    selector = "f2+l2" if kind == "resample" else [0, -1]
    ids = list(IDS)
    g = rg.Graph()
    if kind == "splice":
        g.add(rg.Site("mlp_out", layer=1, positions=selector), tc, name="n")
        op = None
    else:
        op = op_for(kind, len(ids), tc)
        g.add(rg.Site("mlp_out", layer=1, positions=selector, subspace=IDS), op, name="n")
    out = g.run(lm, BASE, padding_side=side)
    base_in = encode(lm.tokenizer, BASE, side)
    real = real_positions(base_in["attention_mask"])
    slots = [(b, j, real[b][r]) for b in range(len(BASE)) for j, r in enumerate(positions_of(selector, len(real[b])))]
    seen = {}

    def edit(x, y):
        feats = hand_features(tc, x)[..., ids]
        seen["f"] = feats.detach()
        mean = torch.stack([feats[b, p] for b, _, p in slots]).mean(0)
        perm = derangement(len(BASE), 3)
        new = y.clone()
        for b, j, p in slots:
            if kind == "splice":
                new[b, p] = (hand_features(tc, x[b, p]) @ tc.W_dec + tc.b_dec) / tc.scale
                continue
            other = lambda: feats[perm[b], real[perm[b]][positions_of(selector, len(real[perm[b]]))[j]]]  # noqa: E731
            value = new_value(kind, op, feats[b, p], mean, None, other)
            new[b, p] = y[b, p] + (value - feats[b, p]) @ tc.W_dec[ids] / tc.scale
        return new

    ref = mlp_run(lm, base_in, edit)
    if kind == "collect":
        for b, j, p in slots:
            torch.testing.assert_close(out["n"][b, j], seen["f"][b, p], atol=ATOL, rtol=0)
        return
    same_outputs_and_gradients(lm, g, out, ref, base_in)


def test_a_transcoder_identity_edit_and_bad_input(lm):
    tc = transcoder("relu")
    g = rg.Graph()
    g.add(rg.Site("mlp_out", 1), rg.Add(torch.zeros(64), basis=tc), name="same")
    torch.testing.assert_close(g.run(lm, BASE).logits, rg.Graph().run(lm, BASE).logits, atol=0, rtol=0)
    assert "its node sits at mlp_out, not at resid_post" in bad(lm, rg.Collect(basis=tc))
    assert "its source site must be mlp_out of layer 1" in bad(
        lm, rg.Patch("base", site=rg.Site("mlp_out", 0), basis=tc), rg.Site("mlp_out", 1))
    with pytest.raises(ValueError, match="that is a transcoder"):
        rg.Dictionary(32, 64, d_out=16)


def mlp_io(lm, inputs):
    """Layer 1's MLP input and output in a plain forward of ``inputs``."""
    seen = {}
    handle = lm.hf.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            lm.hf(**inputs)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("error", [False, True])
def test_a_transcoder_patch_encodes_the_source_streams_mlp_input(lm, error, side):
    """Features patched from the source run are the transcoder's features of the *source's* MLP
    input; with ``error=True`` the source's error ``y - decode(f)`` replaces the slot's own."""
    tc, ids, selector = transcoder("topk"), list(IDS), [0, -1]
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=1, positions=selector, subspace=IDS), rg.Patch("source", basis=tc, error=error),
          name="n")
    out = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side)
    base_in, src_in = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    x_src, y_src = mlp_io(lm, src_in)
    real, src_real = real_positions(base_in["attention_mask"]), real_positions(src_in["attention_mask"])

    def edit(x, y):
        new = y.clone()
        for b in range(len(BASE)):
            for j, r in enumerate(positions_of(selector, len(real[b]))):
                p, q = real[b][r], src_real[b][positions_of(selector, len(src_real[b]))[j]]
                f, f_src = hand_features(tc, x[b, p]), hand_features(tc, x_src[b, q])
                new[b, p] = y[b, p] + (f_src[ids] - f[ids]) @ tc.W_dec[ids] / tc.scale
                if error:
                    decode = lambda feats: (feats @ tc.W_dec + tc.b_dec) / tc.scale   # noqa: E731
                    new[b, p] = new[b, p] + (y_src[b, q] - decode(f_src)) - (y[b, p] - decode(f))
        return new
    same_outputs_and_gradients(lm, g, out, mlp_run(lm, base_in, edit), base_in)


def test_a_graph_with_a_transcoder_saves_and_loads(lm, tmp_path):
    tc = transcoder("jumprelu")
    g = rg.Graph()
    g.add(rg.Site("mlp_out", 1, subspace=(3,)), rg.Add(torch.ones(1), scale=2.0, basis=tc), name="steer")
    back = rg.load_graph(rg.save(g, tmp_path / "g"))
    assert back["steer"].op.basis.reads == "mlp"
    assert torch.equal(g.run(lm, BASE).logits, back.run(lm, BASE).logits)


def test_generation_steers_every_new_token_through_a_transcoder(lm):
    tc = transcoder("relu")
    add = rg.Add(torch.full((2,), 3.0), basis=tc)
    g = rg.Graph()
    g.add(rg.Site("mlp_out", 1, positions="all", subspace=(3, 10)), add, name="steer")
    ours = g.generate(lm, ["the cat"], max_new_tokens=4).new_ids
    inputs = encode(lm.tokenizer, ["the cat"], "left")

    def edit(module, args, out):          # every position the MLP sees, prompt and new tokens alike
        f = hand_features(tc, args[0])[..., [3, 10]]
        return out + ((f + 3.0) - f) @ tc.W_dec[[3, 10]]

    handle = lm.hf.model.layers[1].mlp.register_forward_hook(edit)
    try:
        theirs = lm.hf.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    finally:
        handle.remove()
    assert ours.tolist() == theirs.tolist()
    assert ours.tolist() != rg.Graph().generate(lm, ["the cat"], max_new_tokens=4).new_ids.tolist()   # it steers


def test_transcoder_attribution_equals_the_plain_hook_linearisation(lm):
    tc = transcoder("relu")
    cfg = lm.hf.config
    clean_in, corrupt_in = encode(lm.tokenizer, DATA.source, "right"), encode(lm.tokenizer, DATA.base, "right")
    mlp, seen = lm.hf.model.layers[1].mlp, {}

    def keep(module, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()
        seen["delta"] = torch.zeros_like(out, requires_grad=True)
        return out + seen["delta"]

    handle = mlp.register_forward_hook(keep)
    try:
        with torch.no_grad():
            lm.hf(**corrupt_in)
        x1, y1 = seen["x"], seen["y"]
        logits = lm.hf(**clean_in).logits
    finally:
        handle.remove()
    x0, y0 = seen["x"], seen["y"]
    last = clean_in["attention_mask"].sum(1) - 1
    nxt = logits[torch.arange(2), last]
    ids = [lm.tokenizer(a)["input_ids"][-1] for a in DATA.correct], [lm.tokenizer(a)["input_ids"][-1] for a in DATA.wrong]
    g = torch.autograd.grad((nxt[torch.arange(2), ids[0]] - nxt[torch.arange(2), ids[1]]).sum(), seen["delta"])[0]
    mask = clean_in["attention_mask"][..., None].float()
    f0, f1 = hand_features(tc, x0), hand_features(tc, x1)
    features = ((f1 - f0) * (g @ tc.W_dec.T) * mask).sum((0, 1)) / 2
    error = lambda f, y: y - (f @ tc.W_dec + tc.b_dec)   # noqa: E731
    err = ((error(f1, y1) - error(f0, y0)) * g * mask).sum() / 2
    table = rg.features.attribute(lm, DATA, {rg.Site("mlp_out", 1): tc}, progress=False)
    torch.testing.assert_close(torch.tensor(table.estimate[:64].tolist()), features, atol=1e-5, rtol=1e-4)
    assert table.estimate.iloc[-1] == pytest.approx(float(err), abs=1e-5)
    circuit = rg.features.discover(lm, DATA, {rg.Site("mlp_out", 1): tc}, size=3, ablate="mean", table=table)
    assert len(circuit.kept) == 3 and isinstance(circuit.nodes[0].op, rg.Ablate)


def test_transcoder_integrated_gradients_equal_plain_hooks(lm):
    """mlp_out = decode(f) + e is affine in the features and the error, so moving mlp_out from
    its clean to its corrupted value moves them along their straight line: the gradient at each
    step, along each decoder direction, averaged, times (f_corrupt - f_clean)."""
    tc, steps = transcoder("relu"), 3
    clean_in, corrupt_in = encode(lm.tokenizer, DATA.source, "right"), encode(lm.tokenizer, DATA.base, "right")
    (x0, y0), (x1, y1) = mlp_io(lm, clean_in), mlp_io(lm, corrupt_in)
    last = clean_in["attention_mask"].sum(1) - 1
    ids = [lm.tokenizer(a)["input_ids"][-1] for a in DATA.correct], [lm.tokenizer(a)["input_ids"][-1] for a in DATA.wrong]
    mask = clean_in["attention_mask"][..., None].float()

    def grad_at(alpha):
        leaf = {}

        def edit(x, y):
            leaf["y"] = (y0 + alpha * (y1 - y0)).where(mask.bool(), y).detach().requires_grad_(True)
            return leaf["y"]
        nxt = mlp_run(lm, clean_in, edit)[torch.arange(2), last]
        return torch.autograd.grad((nxt[torch.arange(2), ids[0]] - nxt[torch.arange(2), ids[1]]).sum(), leaf["y"])[0]

    g = sum(grad_at((k + 0.5) / steps) for k in range(steps)) / steps
    f0, f1 = hand_features(tc, x0), hand_features(tc, x1)
    features = ((f1 - f0) * (g @ tc.W_dec.T) * mask).sum((0, 1)) / 2
    error = lambda f, y: y - (f @ tc.W_dec + tc.b_dec)   # noqa: E731
    err = ((error(f1, y1) - error(f0, y0)) * g * mask).sum() / 2
    table = rg.features.attribute(lm, DATA, {rg.Site("mlp_out", 1): tc}, method="ig", steps=steps, progress=False)
    torch.testing.assert_close(torch.tensor(table.estimate[:64].tolist()), features, atol=1e-5, rtol=1e-4)
    assert table.estimate.iloc[-1] == pytest.approx(float(err), abs=1e-5)


def test_a_transcoder_feature_circuit_patches_from_the_corrupted_run(lm):
    """Outside features take the corrupted run's (encoded from its MLP input); none kept with the
    error ablated is the MLP's whole output taken from the corrupted run."""
    tc = transcoder("relu")
    sites = {rg.Site("mlp_out", 1): tc}
    clean_in, corrupt_in = encode(lm.tokenizer, DATA.source, "right"), encode(lm.tokenizer, DATA.base, "right")
    x1, y1 = mlp_io(lm, corrupt_in)        # (rows of equal lengths: right padding lines their tokens up)
    everything = __import__("pandas").DataFrame({"site": "mlp_out[1]", "feature": range(64)})
    nothing = rg.features.circuit_graph(lm, DATA, sites, everything.iloc[:0], errors="ablate")
    out = nothing.run(lm, DATA.source, sources={"corrupt": DATA.base})
    compare_logits(out.logits, out.attention_mask[out.rows["base"]], mlp_run(lm, clean_in, lambda x, y: y1),
                   clean_in["attention_mask"], 1e-5)
    assert rg.features.faithfulness(nothing, lm, DATA, progress=False)["faithfulness"] == pytest.approx(0, abs=1e-6)
    found = rg.features.discover(lm, DATA, sites, size=3, progress=False)
    assert len(found.kept) == 3 and isinstance(found.nodes[0].op, rg.Patch)
    outside = list(found.nodes[0].site.subspace)

    def edit(x, y):     # the clean MLP output with the outside features moved to their corrupted values
        f0, f1 = hand_features(tc, x)[..., outside], hand_features(tc, x1)[..., outside]
        return y + (f1 - f0) @ tc.W_dec[outside] / tc.scale
    ours = found.run(lm, DATA.source, sources={"corrupt": DATA.base})
    compare_logits(ours.logits, ours.attention_mask[ours.rows["base"]], mlp_run(lm, clean_in, edit),
                   clean_in["attention_mask"], 1e-5)


def test_a_transcoder_on_gemma3_reads_the_normed_input_and_writes_after_the_post_norm():
    """Gemma 3 (norms before and after the MLP): the MLP's input is the pre-feed-forward norm's
    output; mlp_out, where the decoder writes, is the post-feed-forward norm's output."""
    lm = rg.models.tiny("gemma3_text")
    width = lm.arch.d_model
    tc = rg.Dictionary(width, 64, d_out=width, reads="mlp", seed=4)
    g = rg.Graph()
    g.add(rg.Site("mlp_out", 1), tc, name="splice")
    out = g.run(lm, BASE)
    layer, seen = lm.hf.model.layers[1], {}
    inputs = encode(lm.tokenizer, BASE, "right")
    h1 = layer.mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    h2 = layer.post_feedforward_layernorm.register_forward_hook(
        lambda module, args, y: hand_features(tc, seen["x"]) @ tc.W_dec + tc.b_dec)
    try:
        ref = lm.hf(**inputs).logits
    finally:
        h1.remove()
        h2.remove()
    compare_logits(out.logits, out.attention_mask, ref, inputs["attention_mask"], ATOL)
