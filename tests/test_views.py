"""What results look like when printed or shown in a notebook: compact reprs and HTML views
(shapes, node names, texts; never raw tensors), and figures that a notebook shows once."""

import base64
import warnings

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest

import reftgraph as rg
from reftgraph.viz.figure import Figure

matplotlib.use("Agg")

DATA = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def test_run_result_shows_shapes_and_node_names_not_tensors(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="prompt"), rg.Collect(), name="r0")
    g.add(rg.Site("head_out", layer=1, head=(0, 2), positions="last"), rg.Collect(), name="heads")
    out = g.run(lm, ["abcd", "ab"])
    text, page = repr(out), out._repr_html_()
    assert len(text) < 200 and "tensor(" not in text, text
    assert "r0 [2, 4, 32]" in text and "heads [2, 1, 2, 8]" in text and "logits [2, 4, 259]" in text
    assert "<table" in page and "tensor(" not in page and len(page) < 2000
    assert "&#x27;r0&#x27;" in page and "2 x 4 x 32" in page and "1 rows with fewer positions" in page


def test_generation_shows_its_texts(lm):
    out = rg.Graph().generate(lm, ["hi", "hello", "a", "b"], max_new_tokens=3)
    text, page = repr(out), out._repr_html_()
    assert text.startswith("Generation(4 texts, up to 3 new tokens") and "..." in text and "tensor(" not in text
    assert "<table" in page and page.count("<tr>") == 5 and "tensor(" not in page


def test_a_discovered_circuit_shows_the_heads_it_keeps(lm):
    circuit = rg.circuits.discover(lm, DATA, size=3, progress=False)
    kept = rg.circuits.members(circuit, lm)
    names = {f"L{r.layer}H{r.head}" for r in kept.itertuples()}
    headline = repr(circuit).splitlines()[0]
    assert headline.startswith("Circuit: keeps 3 of 8 heads") and all(n in headline for n in names), headline
    assert sorted(map(tuple, circuit.kept[["layer", "head"]].values.tolist())) == \
        sorted(map(tuple, kept[["layer", "head"]].values.tolist()))
    assert list(circuit.kept["score"]) == sorted(circuit.kept["score"], reverse=True)
    page = circuit._repr_html_()
    assert "<table" in page and "score" in page and "method=atp" in page
    assert circuit.settings["size"] == 3 and circuit.total == 8
    assert isinstance(circuit | rg.Graph(), rg.Graph)           # still a graph: composes, runs, saves
    mean = rg.circuits.circuit_graph(lm, DATA, kept, ablate="mean")
    assert "take their mean over the corrupted prompts" in repr(mean)


def figures(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Patch("source"), name="p")
    sweep = rg.patching.sweep(lm, DATA, "resid_pre", positions=[-2, -1], progress=False)
    history = pd.DataFrame({"epoch": [0, 0], "step": [0, 1], "loss": [2.0, 1.0], "lr": 0.1})
    effects = pd.DataFrame({"node": "r", "mode": ["ablate", "steer"], "dims": ["0", "0"], "effect": [1.0, -1.0]})
    curve = pd.DataFrame({"method": "atp", "size": [1, 2], "fraction": [0.5, 1.0], "normalised": [0.3, 1.0]})
    circuit = rg.circuits.circuit_graph(lm, None, pd.DataFrame({"kind": ["head"], "layer": [1], "head": [2]}))
    return {"draw": g.draw(), "heatmap": rg.patching.heatmap(sweep), "plot_history": rg.viz.plot_history(history),
            "plot_effects": rg.subspace.plot_effects(effects), "plot_curve": rg.circuits.plot_curve(curve),
            "circuits.draw": rg.circuits.draw(circuit, lm)}


def test_every_plot_returns_a_figure_that_a_notebook_shows_once(lm, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda data, raw: shown.append(data))
    plt.close("all")
    for name, fig in figures(lm).items():
        assert isinstance(fig, Figure), name
        number = fig.canvas.manager.num
        assert plt.fignum_exists(number), name           # pyplot holds it: plt.show() shows it in a script
        fig._ipython_display_()                           # IPython shows the cell's value ...
        assert len(shown) == 1 and base64.b64decode(shown.pop()["image/png"])[:4] == b"\x89PNG", name
        assert not plt.fignum_exists(number), name       # ... and the inline backend has nothing left to show


def test_heatmap_labels_its_token_axis(lm):
    df = rg.patching.sweep(lm, DATA, "resid_pre", positions=[-2, -1], progress=False)
    ax = rg.patching.heatmap(df).axes[0]
    assert ax.get_xlabel() == "position (token of base prompt 0)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-2\n' '", "-1\n'd'"]     # "ab c d": its last tokens


@pytest.mark.parametrize("plot", ["heatmap", "plot_curve", "circuits.draw"])
def test_plots_that_returned_axes_still_answer_axes_methods_with_a_warning(lm, plot):
    fig = figures(lm)[plot]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.set_title("old callers")
        assert fig.get_title() == "old callers" and fig.figure is fig
    assert caught and all(w.category is FutureWarning and "fig.axes[0]." in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        fig.no_such_method()
