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
