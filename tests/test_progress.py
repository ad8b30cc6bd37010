"""Long calls show a progress bar on stderr (a widget in Jupyter with ipywidgets), and
``progress=False`` silences it."""

import importlib.util

import pytest
import tqdm.auto
import tqdm.std

import reftgraph as rg
from reftgraph.viz import progress as progress_module

DATA = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
DAS_DATA = rg.patching.Counterfactual(["ab", "cd"], ["ef", "gh"], correct=["x", "y"])


def rotate_graph():
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Rotate(width=32, k=2, seed=0), name="das")
    return g


def reft_graph():
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="r")
    return g


def steer(lm):
    return rg.steering.diffmean(lm, ["yes"], ["no"], rg.Site("resid_post", layer=0), progress=False)


CALLS = {   # name: (the bar's label, the call with a progress= keyword)
    "sweep": ("sweep", lambda lm, p: rg.patching.sweep(lm, DATA, "mlp_out", progress=p)),
    "sweep remote": ("sweep (remote traces)",
                     lambda lm, p: rg.patching.sweep(lm, DATA, "mlp_out", remote="local", progress=p)),
    "path_sweep": ("path sweep", lambda lm, p: rg.patching.path_sweep(lm, DATA, progress=p)),
    "attribute": ("attribute", lambda lm, p: rg.patching.attribute(lm, DATA, "head_out", progress=p)),
    "circuits.discover": ("attribute", lambda lm, p: rg.circuits.discover(lm, DATA, size=2, progress=p)),
    "circuits.faithfulness": ("circuit runs", lambda lm, p: rg.circuits.faithfulness(
        rg.circuits.discover(lm, DATA, size=2, progress=False), lm, DATA, progress=p)),
    "circuits.curve": ("circuit runs", lambda lm, p: rg.circuits.curve(lm, DATA, sizes=[2], progress=p)),
    "das.train_das": ("das", lambda lm, p: rg.das.train_das(rotate_graph(), lm, DAS_DATA, epochs=1, batch_size=2,
                                                            progress=p)),
    "das.iia": ("predict", lambda lm, p: rg.das.iia(rotate_graph(), lm, DAS_DATA, progress=p)),
    "memorise": ("memorise L0 n=2", lambda lm, p: rg.memorisation.memorise(lm, "ab", layer=0, max_steps=2, progress=p)),
    "steering.diffmean": ("contrast", lambda lm, p: rg.steering.diffmean(lm, ["yes"], ["no"],
                                                                         rg.Site("resid_post", layer=0), progress=p)),
    "steering.scale_sweep": ("scale sweep", lambda lm, p: rg.steering.scale_sweep(
        lm, steer(lm), ["Hi"], [0, 2], lambda t: True, max_new_tokens=2, progress=p)),
    "subspace.effects": ("subspace effects", lambda lm, p: rg.subspace.effects(
        reft_graph(), "r", lm, ["ab"], metric=lambda logits: logits[:, 5], progress=p)),
}


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


@pytest.mark.parametrize("name", CALLS)
def test_long_calls_show_a_bar_and_progress_false_silences_it(lm, name, capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY", 0)    # show bars from the start (quick calls stay quiet)
    label, call = CALLS[name]
    capsys.readouterr()
    call(lm, False)
    quiet = capsys.readouterr().err
    assert "%|" not in quiet, quiet
    call(lm, True)
    shown = capsys.readouterr().err
    assert f"{label}:" in shown and "100%|" in shown, shown


def test_quick_calls_stay_quiet_with_the_default_delay(lm, capsys):
    capsys.readouterr()
    rg.patching.sweep(lm, DATA, "mlp_out", layers=[1])
    assert "%|" not in capsys.readouterr().err


def test_text_bar_without_ipywidgets(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    assert progress_module.bar_class() is tqdm.std.tqdm      # tqdm.auto would warn "IProgress not found"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ipywidgets" else None)
    assert progress_module.bar_class() is tqdm.auto.tqdm
