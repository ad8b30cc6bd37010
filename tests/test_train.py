"""``rg.train``: loss goes down, the history and its lr schedule, gradient accumulation, a frozen
language model, exact resume, eval callbacks, classification, padding sides and errors."""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import torch

import reftgraph as rg
import reftgraph.training.supervised

PAIRS = [("ab", "x"), ("cd", "y"), ("ef", "z"), ("gh", "w")]
EQUAL = [("abc", "de"), ("fgh", "ij"), ("klm", "no"), ("pqr", "st")]  # equal prompt and response lengths




@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


@pytest.fixture(scope="module")
def tiny():
    """``tiny(family, **config)``: tiny random models, built once per module."""
    cache = {}

    def build(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = rg.models.tiny(family, **overrides)
        return cache[key]

    return build


def fingerprint(model) -> dict:
    tensors = dict(model.hf.named_parameters())
    tensors.update({f"buffer:{k}": v for k, v in model.hf.named_buffers()})
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for k, v in tensors.items()}


def params(g) -> dict:
    return {k: v.detach().clone() for k, v in g.ops.named_parameters()}


# -- (1) memorisation, history, schedule, (3) frozen model ----------------------------------

@pytest.fixture(scope="module")
def memorised(tiny):
    """Memorise 4 one-token responses. A random tiny model with the default init (std 0.02) has
    near-uniform logits that no edit of a normalised residual can sharpen, so this one uses a
    larger init."""
    model = tiny("llama", initializer_range=0.5)
    g = rg.reft_graph(model, layers="all", positions="all", rank=8)
    before = fingerprint(model)
    grads_before = [p.requires_grad for p in model.hf.parameters()]
    history = rg.train(g, model, rg.data.PromptResponse(PAIRS), epochs=12, batch_size=4, lr=0.1, warmup=0.25,
                       progress=False)
    return dict(model=model, graph=g, history=history, before=before, after=fingerprint(model),
                grads_before=grads_before)


def test_loss_goes_down(memorised):
    loss = memorised["history"]["loss"]
    assert loss.iloc[-1] < 0.25 * loss.iloc[0]
    assert np.isfinite(loss).all()


def test_history_one_row_per_step(memorised):
    h = memorised["history"]
    assert isinstance(h, pd.DataFrame)
    assert list(h.columns[:4]) == ["epoch", "step", "loss", "lr"]
    assert len(h) == 12  # 4 rows, batch 4, 12 epochs: one optimizer step per epoch
    assert h["step"].tolist() == list(range(12))
    assert h["epoch"].tolist() == list(range(12))


def test_lr_schedule_linear_warmup_then_decay_to_zero(memorised):
    lr = memorised["history"]["lr"].to_numpy() / 0.1
    peak = int(np.argmax(lr))
    assert peak >= 1, "no warm-up"
    assert lr[peak] == pytest.approx(1.0)
    rise = np.diff(lr[:peak + 1])
    assert (rise > 0).all() and np.allclose(rise, rise[0]), lr  # linear warm-up
    end_of_peak = peak + int(np.sum(np.isclose(lr[peak:], 1.0))) - 1
    fall = np.diff(lr[end_of_peak:])
    assert (fall < 0).all() and np.allclose(fall, fall[0]), lr  # linear decay ...
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)              # ... to zero


def test_language_model_untouched(memorised):
    assert memorised["before"] == memorised["after"]
    model = memorised["model"]
    assert not any(p.requires_grad for p in model.hf.parameters())
    assert memorised["grads_before"] == [p.requires_grad for p in model.hf.parameters()]
    assert not model.hf.training
    assert not memorised["graph"].ops.training  # the graph is back in eval mode


# -- (2) gradient accumulation --------------------------------------------------------------

def test_grad_accum_matches_bigger_batch(lm):
    data = rg.data.PromptResponse(EQUAL)
    graphs = [rg.reft_graph(lm, layers="all", positions="f1+l1", rank=4, seed=0) for _ in range(2)]
    start = params(graphs[0])
    h_acc = rg.train(graphs[0], lm, data, epochs=2, batch_size=2, grad_accum=2, lr=1e-2, progress=False)
    h_big = rg.train(graphs[1], lm, data, epochs=2, batch_size=4, grad_accum=1, lr=1e-2, progress=False)
    assert len(h_acc) == len(h_big) == 2
    np.testing.assert_allclose(h_acc["loss"], h_big["loss"], atol=1e-5)
    np.testing.assert_allclose(h_acc["lr"], h_big["lr"])
    acc, big = params(graphs[0]), params(graphs[1])
    moved = {k.split(".")[0] for k in acc if (acc[k] - start[k]).abs().max() > 1e-3}
    # L1_first (the last layer's output at the first token) reaches no labelled token: no gradient
    assert moved == {"L0_first", "L0_last", "L1_last"}
    for k in acc:
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=0)


def test_partial_accumulation_group_still_gets_a_learning_rate(lm):
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    data = rg.data.PromptResponse(EQUAL[:3])
    h = rg.train(g, lm, data, epochs=1, batch_size=1, grad_accum=2, warmup=0.0, progress=False)
    assert len(h) == 2  # batches [0, 1] then the partial group [2]
    assert h["lr"].iloc[0] > 0  # the lr the second (last) step uses
    assert h["lr"].iloc[-1] == pytest.approx(0.0)


# -- (4) exact resume, (5) eval_fn ------------------------------------------------------------

class Interrupted(Exception):
    pass


def test_exact_resume_and_eval_fn(lm, tmp_path):
    """A 2-epoch run interrupted after epoch 0 (its checkpoint written), resumed in a fresh graph,
    ends bit-identical to the straight 2-epoch run: data order, AdamW moments, the lr schedule
    and the dropout random state all continue."""
    data = rg.data.PromptResponse(PAIRS)

    def build():
        return rg.reft_graph(lm, layers="all", positions="f1+l1", rank=4, dropout=0.3, seed=0)

    calls = []

    def eval_fn(graph, model, epoch):
        calls.append((epoch, graph.ops.training, torch.is_grad_enabled(), model is lm))
        return {"metric": 10.0 + epoch}

    kw = dict(epochs=2, batch_size=2, lr=2e-2, warmup=0.25, progress=False)
    straight = build()
    h_straight = rg.train(straight, lm, data, eval_fn=eval_fn, **kw)

    # (5) eval_fn: once per epoch, eval mode, no grad; its dict lands on the epoch's last row
    assert calls == [(0, False, False, True), (1, False, False, True)]
    assert len(h_straight) == 4 and h_straight["epoch"].tolist() == [0, 0, 1, 1]
    assert h_straight["metric"].isna().tolist() == [True, False, True, False]
    assert h_straight["metric"].dropna().tolist() == [10.0, 11.0]

    def crash_at_1(graph, model, epoch):
        if epoch == 1:
            raise Interrupted
        return eval_fn(graph, model, epoch)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        rg.train(build(), lm, data, eval_fn=crash_at_1, checkpoint_dir=ckpt, **kw)
    assert sorted(os.listdir(ckpt)) == ["epoch-0"]  # epoch 1 never finished: no checkpoint, no temp folder
    assert {"graph.json", "weights.safetensors"} <= set(os.listdir(ckpt / "epoch-0"))
    assert set(rg.load_graph(ckpt / "epoch-0", model=lm).dag) == set(straight.dag)

    resumed = build()
    h_resumed = rg.train(resumed, lm, data, eval_fn=eval_fn, checkpoint_dir=ckpt, resume=True, **kw)
    assert sorted(os.listdir(ckpt)) == ["epoch-0", "epoch-1"]
    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pd.testing.assert_frame_equal(h_straight, h_resumed, check_exact=True)

    # resuming a finished run changes nothing
    h_again = rg.train(resumed, lm, data, eval_fn=eval_fn, checkpoint_dir=ckpt, resume=True, **kw)
    pd.testing.assert_frame_equal(h_straight, h_again, check_exact=True)
    for k, v in params(resumed).items():
        assert torch.equal(v, b[k])


# -- (6) classification -----------------------------------------------------------------------

def test_classification_learns_first_letter(lm):
    texts = ["a" + m + "." for m in "pqrs"] + ["b" + m + "." for m in "pqrs"]
    labels = [0] * 4 + [1] * 4
    g = rg.reft_graph(lm, layers="all", positions="f1+l1", rank=8, seed=0)
    torch.manual_seed(0)
    g.add(rg.Site("resid_post", layer=-1, positions="last"), rg.Classify(width=32, n_classes=2), name="cls")
    h = rg.train(g, lm, rg.data.Classification(texts, labels), epochs=8, batch_size=8, lr=5e-2,
                 progress=False)
    assert h["loss"].iloc[-1] < 0.8 * h["loss"].iloc[0]
    logits = g.run(lm, texts)["cls"]
    assert logits.shape == (8, 2)
    accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.9


# -- (7) padding sides ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_padding_side_does_not_change_the_loss(tiny, family):
    model = tiny(family)
    data = rg.data.PromptResponse([("a", "bc"), ("defgh", "i"), ("jk", "lmnop")])
    losses = {}
    for side in ("left", "right"):
        g = rg.reft_graph(model, layers="all", positions="f1+l1", rank=4, seed=0)
        h = rg.train(g, model, data, epochs=1, batch_size=3, padding_side=side, progress=False)
        losses[side] = h["loss"].iloc[0]
    assert losses["left"] == pytest.approx(losses["right"], abs=1e-5)


# -- (8) errors -------------------------------------------------------------------------------

def test_errors(lm):
    data = rg.data.PromptResponse(PAIRS)
    collect_only = rg.Graph()
    collect_only.add(rg.Site("resid_post", layer=0, positions="last"), rg.Collect(), name="c")
    with pytest.raises(ValueError, match="no trainable parameters"):
        rg.train(collect_only, lm, data, progress=False)
    frozen = rg.reft_graph(lm, layers=[0], positions="last", rank=2).freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        rg.train(frozen, lm, data, progress=False)

    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2)
    unfrozen = rg.models.tiny("llama")
    unfrozen.hf.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze"):
        rg.train(g, unfrozen, data, progress=False)

    with pytest.raises(ValueError, match="Classify"):
        rg.train(g, lm, rg.data.Classification(["a", "b"], [0, 1]), progress=False)
    with pytest.raises(TypeError, match="PromptResponse"):
        rg.train(g, lm, PAIRS, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        rg.train(g, lm, data, resume=True, progress=False)
    with pytest.raises(rg.SiteError):
        rg.train(g, lm.hf, data, progress=False)
    with pytest.raises(ValueError):
        rg.data.PromptResponse([])
    with pytest.raises(ValueError):
        rg.data.Classification(["a", "b"], [0])


# -- (9) resume from any checkpoint, non-finite losses -----------------------------------------

def test_resume_from_any_checkpoint_is_exact(lm, tmp_path):
    """Every epoch-N checkpoint of a 3-epoch run, resumed in a fresh graph, ends bit-identical to
    the uninterrupted run (losses, lr, weights); other settings are refused."""
    data = rg.data.PromptResponse(PAIRS + EQUAL[:1])

    def build():
        return rg.reft_graph(lm, layers="all", positions="f1+l1", rank=2, dropout=0.2, seed=0)

    kw = dict(epochs=3, batch_size=2, lr=2e-2, warmup=0.2, progress=False)
    straight = build()
    ckpt = tmp_path / "ckpt"
    h_straight = rg.train(straight, lm, data, checkpoint_dir=ckpt, **kw)
    assert sorted(os.listdir(ckpt)) == ["epoch-0", "epoch-1", "epoch-2"]
    for epoch in (0, 1):
        resumed = build()
        h = rg.train(resumed, lm, data, resume=ckpt / f"epoch-{epoch}", checkpoint_dir=tmp_path / f"again{epoch}",
                     **kw)
        pd.testing.assert_frame_equal(h, h_straight, check_exact=True)
        for k, v in params(straight).items():
            assert torch.equal(params(resumed)[k], v), (epoch, k)
        assert sorted(os.listdir(tmp_path / f"again{epoch}")) == [f"epoch-{e}" for e in range(epoch + 1, 3)]
    with pytest.raises(rg.GraphFileError, match=r"other settings \(batch_size=2, now 4"):
        rg.train(build(), lm, data, resume=ckpt / "epoch-0", **dict(kw, batch_size=4))
    with pytest.raises(ValueError, match=r"not a checkpoint folder .*epoch-0"):
        rg.train(build(), lm, data, resume=ckpt / "epoch-7", **kw)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(lm, tmp_path, monkeypatch):
    data = rg.data.PromptResponse(PAIRS)
    kw = dict(epochs=3, batch_size=2, lr=2e-2, progress=False)
    good = rg.reft_graph(lm, layers=[1], positions="last", rank=2, seed=0)
    rg.train(good, lm, data, checkpoint_dir=tmp_path / "good", **kw)

    original = reftgraph.training.supervised._batch_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss  # epoch 1, its second batch

    monkeypatch.setattr(reftgraph.training.supervised, "_batch_loss", poisoned)
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=2, seed=0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(rg.training.NonFiniteLoss, match=r"loss is nan at epoch 1, step 3 .*last good "
                                                          r"checkpoint is .*epoch-0") as err:
        rg.train(g, lm, data, checkpoint_dir=ckpt, **kw)
    assert sorted(os.listdir(ckpt)) == ["epoch-0"]  # nothing half-written, nothing overwritten
    assert err.value.checkpoint == ckpt / "epoch-0" and len(err.value.history) == 3
    assert np.isfinite(err.value.history["loss"]).all()
    for name, v in params(rg.load_graph(ckpt / "epoch-0")).items():
        assert torch.equal(v, params(rg.load_graph(tmp_path / "good" / "epoch-0"))[name])
    # the graph holds the weights of step 2 (the last good step), finite
    assert all(torch.isfinite(v).all() for v in params(g).values())


def test_nan_from_an_op_stops_before_any_step(lm):
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=2, seed=0)
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(torch.full((32,), float("inf"))), name="bad")
    before = params(g)
    with pytest.raises(rg.training.NonFiniteLoss, match="at epoch 0, step 0 .*no checkpoint was written") as err:
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, progress=False)
    assert err.value.checkpoint is None and err.value.history.empty
    for k, v in params(g).items():
        assert torch.equal(v, before[k])


def test_nan_gradient_with_a_finite_loss_stops_too(lm):
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=2, seed=0)
    g["L1"].op.bias.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(rg.training.NonFiniteLoss, match="gradient norm is nan at epoch 0, step 0"):
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, max_grad_norm=None,
                 progress=False)


@pytest.mark.parametrize("bad,message", [
    (dict(epochs=0), "epochs must be a positive int, got 0"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(grad_accum=0), "grad_accum must be a positive int, got 0"),
    (dict(lr=0.0), "lr must be > 0 and finite, got 0.0"),
    (dict(lr=float("inf")), "lr must be > 0 and finite, got inf"),
    (dict(lr=float("nan")), "lr must be > 0 and finite, got nan"),
    (dict(weight_decay=float("inf")), "weight_decay must be >= 0 and finite, got inf"),
])
def test_bad_training_arguments_fail_before_any_step(lm, bad, message):
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2)
    with pytest.raises(ValueError, match=message):
        rg.train(g, lm, rg.data.PromptResponse([("ab", "cd")]), progress=False, **bad)


# -- (10) resume checks the graph; stray names in the checkpoint folder -------------------------

@pytest.fixture(scope="module")
def checkpoint(lm, tmp_path_factory):
    """A checkpoint of a LoReFT at resid_post[0], last position, rank 2 (one epoch)."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, checkpoint_dir=ckpt, progress=False)
    return ckpt / "epoch-0"


@pytest.mark.parametrize("change, message", [
    (dict(layers=[1]), "node 'L0' (LoReFT at resid_post[0] pos=last) is in the checkpoint, not in this graph; "
                       "node 'L1' (LoReFT at resid_post[1] pos=last) is in this graph"),
    (dict(component="resid_pre"), "node 'L0': site resid_post[0] pos=last, now resid_pre[0] pos=last"),
    (dict(op="DiReFT"), "node 'L0': op LoReFT, now DiReFT"),
    (dict(rank=4), "node 'L0': LoReFT rank=2, now 4"),
    (dict(positions="f1+l1"), "node 'L0_first' (LoReFT at resid_post[0] pos=f1+l0) is in this graph"),
    (dict(layers=[0, 1]), "node 'L1' (LoReFT at resid_post[1] pos=last) is in this graph, not in the checkpoint"),
], ids=["layer", "component", "op", "rank", "positions", "more_nodes"])
def test_resume_refuses_a_checkpoint_of_another_graph(lm, checkpoint, change, message):
    kw = dict(layers=[0], positions="last", rank=2, seed=0)
    g = rg.reft_graph(lm, **dict(kw, **change))
    before = params(g)
    with pytest.raises(rg.GraphFileError) as err:
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=2, batch_size=4, resume=checkpoint, progress=False)
    assert f"cannot resume from {checkpoint}: it was trained with another graph (" in str(err.value)
    assert message in str(err.value) and "\n" not in str(err.value)
    for k, v in params(g).items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_resume_refuses_other_trainable_nodes(lm, checkpoint):
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    g.add(rg.Site("resid_post", layer=1), rg.Add(torch.zeros(32), trainable=False), name="steer")
    g.add(rg.Site("resid_post", layer=1), rg.Collect(), name="c")
    with pytest.raises(rg.GraphFileError, match="node 'steer' .Add at resid_post.1. pos=all. is in this graph"):
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=2, batch_size=4, resume=checkpoint, progress=False)


def test_stray_names_in_the_checkpoint_folder_are_ignored(lm, checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt / "epoch-0")
    (ckpt / "epoch-best").mkdir()
    (ckpt / "epoch-3.log").write_text("notes")
    (ckpt / "epoch-07").mkdir()
    (ckpt / "epoch-x9").mkdir()
    assert rg.training.latest_checkpoint(ckpt) == ckpt / "epoch-0"
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    h = rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, checkpoint_dir=ckpt, resume=True,
                 progress=False)
    assert h["epoch"].tolist() == [0]  # resumed from epoch-0: nothing left to train
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0", "epoch-07", "epoch-3.log", "epoch-best", "epoch-x9"]


def test_resume_from_a_folder_without_state_is_a_file_error(lm, checkpoint, tmp_path):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "epoch-0")
    (tmp_path / "epoch-0" / "state.json").write_text("[1, 2")
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    with pytest.raises(rg.GraphFileError, match="state.json cannot be read"):
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=2, batch_size=4, resume=tmp_path / "epoch-0",
                 progress=False)


# -- (11) a step that makes the weights non-finite is undone ----------------------------------

@pytest.mark.parametrize("epochs", [1, 3])
def test_a_step_that_makes_the_weights_non_finite_is_undone(lm, tmp_path, epochs):
    """lr 3e37 with weight decay 100 turns the weights infinite in the first step: training
    stops there, the weights from before the step are put back, no checkpoint is written."""
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    before = params(g)
    with pytest.raises(rg.training.NonFiniteLoss, match=r"the weights of node\(s\) 'L0' became NaN or infinite in "
                       r"the optimizer step \(lr 3e\+37\) at epoch 0, step 0; the graph was rolled back") as err:
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=epochs, batch_size=4, lr=3e37, weight_decay=100.0,
                 checkpoint_dir=tmp_path, progress=False)
    assert err.value.history.empty and err.value.checkpoint is None
    assert not list(tmp_path.iterdir())  # no checkpoint, finite or not
    for k, v in params(g).items():
        assert torch.equal(v, before[k]), k


def test_an_lr_that_overflows_adamw_stops_cleanly(lm, tmp_path):
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, seed=0)
    before = params(g)
    with pytest.raises(rg.training.NonFiniteLoss, match=r"the optimizer step overflowed \(lr 1e\+38"):
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, lr=1e38, checkpoint_dir=tmp_path,
                 progress=False)
    assert not list(tmp_path.iterdir())
    for k, v in params(g).items():
        assert torch.equal(v, before[k]), k


def test_non_finite_weights_after_good_steps_keep_the_last_good_ones(lm):
    """Steps 0 and 1 are fine; step 2 would make the weights infinite: the graph keeps the
    weights after step 1 (the message says so, truthfully)."""
    g = rg.Graph()
    _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.zeros(32), trainable=True), name="v")
    vector = g["v"].op.vector
    seen = []

    def loss(step):
        seen.append(vector.detach().clone())
        if step == 2:
            with torch.no_grad():
                vector[0] = 3.4e38      # finite, but the next step pushes it past float32's max
        return -vector[0]

    with pytest.raises(rg.training.NonFiniteLoss, match="became NaN or infinite .* at epoch 0, step 2") as err:
        rg.training.fit(g, lm, lambda epoch: [0, 1, 2, 3], loss, epochs=1, lr=1e37, progress=False)
    assert len(err.value.history) == 2
    assert torch.isfinite(vector).all() and float(vector[0].detach()) == pytest.approx(3.4e38)


# -- (12) data must be text --------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: rg.data.PromptResponse([("a", "b"), (None, "x")]), "row 1's prompt must be a string, got None"),
    (lambda: rg.data.PromptResponse([(["a", "b"], "x")]), "row 0's prompt must be a string, got ['a', 'b']"),
    (lambda: rg.data.PromptResponse([("a", 0)]), "row 0's response must be a string, got 0"),
    (lambda: rg.data.Classification(["a", None], [0, 1]), "row 1's text must be a string, got None"),
    (lambda: rg.data.Classification(["a", "b"], [0, 10**9]), "at most 10,000 classes); label 1 is 1000000000"),
    (lambda: rg.data.Classification(["a", "b"], [True, 0]), "label 0 is True"),
], ids=["prompt_none", "prompt_list", "response_int", "text_none", "label_huge", "label_bool"])
def test_data_that_is_not_text_is_refused(build, message):
    with pytest.raises(rg.DataError) as err:
        build()
    assert message in str(err.value)


# -- (12) the KL to the unedited model: kl_weight, kl_data, kl_groups ------------------------------

FACTS = [("Sky?", "Blue it is."), ("Grass?", "Green, mostly."), ("Snow?", "White.")]


def kl_graph(model, seed=0):
    return rg.reft_graph(model, layers=[0, 1], positions="f1+l1", rank=2, seed=seed)


def test_kl_weight_zero_changes_nothing(lm):
    runs = []
    for kw in ({}, dict(kl_weight=0.0), dict(kl_weight=0.0, kl_data=FACTS, kl_groups="case")):
        g = kl_graph(lm)
        h = rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=2, batch_size=2, lr=1e-2, progress=False, **kw)
        runs.append((h, params(g)))
    for h, weights in runs[1:]:
        pd.testing.assert_frame_equal(h, runs[0][0])      # no "ce" / "kl" columns, the same losses
        for k, v in weights.items():
            assert torch.equal(v, runs[0][1][k]), k


@pytest.mark.parametrize("kl_data", [None, FACTS], ids=["training_rows", "kl_data"])
def test_kl_is_zero_for_an_identity_graph(lm, kl_data):
    """A graph that edits nothing (a zero steering vector) has the unedited model's distributions:
    the KL term is 0 and the loss is the plain cross-entropy."""
    def run(**kw):
        g = rg.Graph()
        g.add(rg.Site("resid_post", layer=0), rg.Add(torch.zeros(32), trainable=True), name="v")
        return rg.train(g, lm, rg.data.PromptResponse(PAIRS), epochs=1, batch_size=4, progress=False, **kw)

    h = run(kl_weight=3.0, kl_data=kl_data, kl_groups="case")
    assert abs(h["kl"].iloc[0]) < 1e-6
    assert h["loss"].iloc[0] == pytest.approx(run()["loss"].iloc[0], abs=1e-6)
    assert h["ce"].iloc[0] == pytest.approx(h["loss"].iloc[0], abs=1e-6)


def reference_loss(model, v, rows, kl_rows, weight, groups, layer=1):
    """Cross-entropy on ``rows`` plus ``weight`` x KL(unedited || edited) on the response tokens of
    ``kl_rows``, one row at a time, with a plain forward hook adding ``v`` at the last prompt token
    of ``resid_post[layer]`` (no reftgraph code: tokens by hand, losses with torch functions)."""
    tok, hf = model.tokenizer, model.hf

    def encode(prompt, response):
        p = tok(prompt)["input_ids"]
        return torch.tensor([p + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]), len(p)

    def logits(ids, n_prompt, edit):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            h[0, n_prompt - 1] = h[0, n_prompt - 1] + v
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        handle = hf.model.layers[layer].register_forward_hook(hook) if edit else None
        try:
            return hf(input_ids=ids).logits[0].float()
        finally:
            if handle is not None:
                handle.remove()

    def folded(log_p):
        if groups is None:
            return log_p
        return torch.zeros(int(groups.max()) + 1).index_add(0, groups, log_p.exp()).log()

    ce, n_ce = 0.0, 0
    for prompt, response in rows:
        ids, n = encode(prompt, response)
        out = logits(ids, n, edit=True)
        ce = ce + torch.nn.functional.cross_entropy(out[n - 1:-1], ids[0, n:], reduction="sum")
        n_ce += ids.shape[1] - n
    kl, n_kl = 0.0, 0
    for prompt, response in kl_rows:
        ids, n = encode(prompt, response)
        edited = logits(ids, n, edit=True).log_softmax(-1)
        with torch.no_grad():
            base = logits(ids, n, edit=False).log_softmax(-1)
        for t in range(n - 1, ids.shape[1] - 1):
            b, e = folded(base[t]), folded(edited[t])
            kl = kl + (b.exp() * (b - e)).sum()
            n_kl += 1
    return ce / n_ce + weight * kl / n_kl


@pytest.mark.parametrize("on_rows", [False, True], ids=["kl_data", "training_rows"])
@pytest.mark.parametrize("groups", [None, "case"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_kl_loss_and_gradient_match_plain_pytorch(tiny, on_rows, groups, side):
    from reftgraph.engine.plan import compile_graph
    from reftgraph.training.losses import case_groups
    from reftgraph.training.supervised import _KL, _batch_loss

    model = tiny("llama", initializer_range=0.5)     # peaked distributions: a KL well above zero
    v0 = 20 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Add(v0.clone(), trainable=True), name="v")
    data = rg.data.PromptResponse(PAIRS[:3])
    plan = compile_graph(g, model.arch)
    kl = _KL(plan, model, 0.7, None if on_rows else FACTS, groups, None, seed=0)
    rows, kl_rows = [0, 1, 2], [0, 2]
    loss = _batch_loss(plan, model, data, data.prompts(model), rows if on_rows else (rows, kl_rows), None, side,
                       None, kl=kl)
    loss.backward()

    v = v0.clone().requires_grad_(True)
    reference = reference_loss(model, v, [data.pairs[i] for i in rows],
                               [data.pairs[i] for i in rows] if on_rows else [FACTS[i] for i in kl_rows], 0.7,
                               None if groups is None else case_groups(model.tokenizer))
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    assert float(kl.parts[-1]) > 0.01
    torch.testing.assert_close(g["v"].op.vector.grad, v.grad, atol=1e-5, rtol=1e-4)


def test_kl_keeps_the_edited_model_near_the_unedited_one(tiny):
    """Trained hard on one row, the graph moves the model's answers to other prompts; with a
    KL on those prompts it moves them much less."""
    model = tiny("llama", initializer_range=0.5)
    data = rg.data.PromptResponse([("ab", "zzzz")] * 4)

    def divergence(**kw):
        g = kl_graph(model)
        h = rg.train(g, model, data, epochs=6, batch_size=4, lr=5e-2, progress=False, **kw)
        kl = reftgraph.training.supervised._KL(compile_graph(g, model.arch), model, 1.0, FACTS, None, None, 0)
        with torch.no_grad():
            return float(kl.rows_loss(model, [0, 1, 2], "right", None, False)), h

    from reftgraph.engine.plan import compile_graph

    free, _ = divergence()
    kept, h = divergence(kl_weight=5.0, kl_data=FACTS)
    assert kept < 0.5 * free
    np.testing.assert_allclose(h["ce"] + h["kl"], h["loss"], atol=1e-6)


def test_kl_rows_cover_every_row_once_an_epoch(lm):
    from reftgraph.engine.plan import compile_graph
    from reftgraph.training.supervised import _KL

    kl = _KL(compile_graph(kl_graph(lm), lm.arch), lm, 1.0, FACTS * 3, None, None, seed=0)   # 9 rows
    for epoch in range(3):
        batches = kl.rows(epoch, 4)                  # 4 batches of 3 (the last wraps around)
        assert [len(b) for b in batches] == [3, 3, 3, 3]
        assert set(sum(batches, [])) == set(range(9))
    assert kl.rows(0, 4) != kl.rows(1, 4)            # a new order every epoch


@pytest.mark.parametrize("bad, message", [
    (dict(kl_weight=-1.0), "kl_weight must be a finite number >= 0, got -1.0"),
    (dict(kl_weight=float("nan")), "kl_weight must be a finite number >= 0, got nan"),
    (dict(kl_weight=1.0, kl_groups="lower"), "kl_groups must be None, 'case' or a tensor of group ids, got 'lower'"),
    (dict(kl_weight=1.0, kl_groups=torch.zeros(5, dtype=torch.long)),
     r"kl_groups must give one group id \(an int >= 0\) per token of the model's 259, got a tensor of shape \(5,\)"),
    (dict(kl_weight=1.0, kl_data=[("ab",)]), "PromptResponse takes \\(prompt, response\\) pairs"),
])
def test_bad_kl_arguments_fail_before_any_step(lm, bad, message):
    g = kl_graph(lm)
    before = params(g)
    with pytest.raises(ValueError, match=message):
        rg.train(g, lm, rg.data.PromptResponse(PAIRS), progress=False, **bad)
    assert all(torch.equal(v, before[k]) for k, v in params(g).items())


def test_kl_on_classification_needs_kl_data(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Classify(32, 2), name="cls")
    data = rg.data.Classification(["ab", "cd"], [0, 1])
    with pytest.raises(ValueError, match="kl_weight on Classification data needs kl_data"):
        rg.train(g, lm, data, kl_weight=1.0, progress=False)
    h = rg.train(g, lm, data, kl_weight=1.0, kl_data=FACTS, epochs=1, progress=False)
    assert h["kl"].iloc[0] >= 0


def test_resume_with_kl_is_exact_and_refuses_another_kl_setting(lm, tmp_path):
    data = rg.data.PromptResponse(PAIRS)
    kw = dict(epochs=2, batch_size=2, kl_weight=1.0, kl_data=FACTS, kl_groups="case", checkpoint_dir=tmp_path,
              progress=False)
    straight = rg.train(kl_graph(lm), lm, data, **kw)
    for change in (dict(kl_weight=2.0), dict(kl_data=FACTS[:2]), dict(kl_groups=None)):
        with pytest.raises(rg.GraphFileError, match="kl_"):
            rg.train(kl_graph(lm), lm, data, **dict(kw, **change), resume=tmp_path / "epoch-0")
    resumed = rg.train(kl_graph(lm), lm, data, **kw, resume=tmp_path / "epoch-0")
    assert list(resumed.columns) == ["epoch", "step", "loss", "lr", "ce", "kl"]
    pd.testing.assert_frame_equal(resumed, straight)
