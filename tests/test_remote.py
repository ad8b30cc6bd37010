"""Remote execution: every op and component under nnsight's ``remote="local"`` simulation gives
what a local run gives (logits and collected values), as do sweeps, path patching, DAS and
subspace analyses and generation; what cannot be sent is refused before anything is sent.

The simulation here is stricter than nnsight's own: while a request is deserialised,
reftgraph cannot be imported at all (a server does not have it), so each request must carry
reftgraph's code by value."""

import sys
import threading

import pytest
import torch

import reftgraph as rg
from reftgraph.core.sites import END_COMPONENTS, KEY_COMPONENTS
from nnsight.intervention.backends.local import LocalSimulationBackend
from test_oracle import BASE, SOURCE, op_for, site_for

ATOL = 1e-6
KINDS = ("patch", "add", "set", "zero", "mean", "resample", "collect",
         "LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT", "rotate", "boundless")


@pytest.fixture(autouse=True)
def server_without_reftgraph(monkeypatch):
    """Deserialise every simulated request with reftgraph unimportable; count the requests."""
    hide, restore = LocalSimulationBackend._hide_local_modules, LocalSimulationBackend._restore
    requests = []

    def hide_all(self):
        hidden = hide(self)
        hidden["finders"] = [(i, f) for i, f in enumerate(sys.meta_path) if "reftgraph" in repr(f)]
        for _, f in hidden["finders"]:
            sys.meta_path.remove(f)
        hidden["reftgraph"] = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "reftgraph"}
        requests.append(1)
        return hidden

    def restore_all(self, hidden):
        for i, f in hidden.pop("finders"):   # back where they were: the old-path finder comes first
            sys.meta_path.insert(i, f)
        sys.modules.update(hidden.pop("reftgraph"))
        restore(self, hidden)

    monkeypatch.setattr(LocalSimulationBackend, "_hide_local_modules", hide_all)
    monkeypatch.setattr(LocalSimulationBackend, "_restore", restore_all)
    return requests


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def other(request):
    return rg.models.tiny(request.param)


def op_of(kind, width):
    if kind in ("rotate", "boundless"):
        return rg.Rotate(width=width, k=3, boundless=kind == "boundless", seed=1)
    return op_for(kind, width)


def same(a, b):
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    assert a.collected.keys() == b.collected.keys()
    for name in a.collected:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0)
        assert torch.equal(a.valid[name], b.valid[name])


def check(lm, component, kind, side, requests):
    if lm.arch.refusal(component, lm.arch.layer_index(END_COMPONENTS.get(component, 1))):
        pytest.skip(f"{lm.arch.family.name} has no {component}")
    g = rg.Graph()
    g.add(site_for(lm, component, "f2+l2", None), op_of(kind, lm.arch.width(component)), name="n")
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="after")
    sources = {"source": SOURCE} if kind in ("patch", "rotate", "boundless") else None
    here = g.run(lm, BASE, sources=sources, padding_side=side, grad=False)
    there = g.run(lm, BASE, sources=sources, padding_side=side, remote="local")
    same(here, there)
    assert len(requests) == 1


COMPONENTS = [c for c in rg.COMPONENTS if c not in KEY_COMPONENTS]   # attn_pattern is refused remotely (below)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_op_and_component_remote_local(lm, component, kind, server_without_reftgraph):
    side = ("left", "right")[(KINDS.index(kind) + COMPONENTS.index(component)) % 2]   # each side half the time
    check(lm, component, kind, side, server_without_reftgraph)


@pytest.mark.parametrize("kind", ["patch", "LoReFT", "collect", "boundless"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_more_families_remote_local(other, component, kind, server_without_reftgraph):
    check(other, component, kind, ("left", "right")[COMPONENTS.index(component) % 2], server_without_reftgraph)


def test_a_trained_graph_runs_remotely_as_here():
    lm = rg.models.tiny("llama")
    g = rg.reft_graph(lm, layers=[0, 1], positions="f1+l1", rank=2)
    rg.train(g, lm, rg.data.PromptResponse([("ab", "cd"), ("abc", "d")]), epochs=3, lr=0.05, progress=False)
    same(g.run(lm, BASE, grad=False), g.run(lm, BASE, remote="local"))


def data():
    return rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"],
                                      wrong=["d", "w"])


@pytest.mark.parametrize("component, positions", [("resid_pre", None), ("head_out", None), ("mlp_out", None),
                                                   ("k", [0, -1])])
def test_sweep_in_one_session(component, positions, server_without_reftgraph):
    lm = rg.models.tiny("llama")
    here = rg.patching.sweep(lm, data(), component, positions=positions)
    there = rg.patching.sweep(lm, data(), component, positions=positions, remote="local")
    assert len(server_without_reftgraph) == 1          # one request for every condition
    torch.testing.assert_close(torch.tensor(there["value"].values), torch.tensor(here["value"].values),
                               atol=1e-6, rtol=0)
    for key in ("base", "source"):
        assert there.attrs[key] == pytest.approx(here.attrs[key], abs=1e-6)
    assert here["value"].nunique() > 1


def test_path_patching_in_one_session(server_without_reftgraph):
    lm = rg.models.tiny("llama")
    receivers = [rg.Site("q", layer=1, head=(0,), positions="last")]
    for kwargs in ({}, {"receivers": receivers}):
        here, there = rg.patching.path_sweep(lm, data(), **kwargs), rg.patching.path_sweep(lm, data(), remote="local",
                                                                                             **kwargs)
        torch.testing.assert_close(torch.tensor(there["value"].values), torch.tensor(here["value"].values),
                                   atol=1e-6, rtol=0)
    one = rg.patching.path_patch(lm, data(), senders=[(0, 1), (0, 3)], remote="local")
    assert one["value"] == pytest.approx(rg.patching.path_patch(lm, data(), senders=[(0, 1), (0, 3)])["value"],
                                         abs=1e-6)
    assert len(server_without_reftgraph) == 3


def test_das_and_subspace_analyses(server_without_reftgraph):
    lm = rg.models.tiny("llama")
    cf = rg.patching.Counterfactual(["ab", "cd", "e"], ["ef", "gh", "i"], correct=["a", "b", "c"],
                                    meta=[{"type": "x"}, {"type": "y"}, {"type": "x"}])
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Rotate(width=32, k=4, seed=0), name="d")
    assert torch.equal(rg.das.predict(g, lm, cf, batch_size=2), rg.das.predict(g, lm, cf, batch_size=2,
                                                                               remote="local"))
    assert rg.das.iia(g, lm, cf).equals(rg.das.iia(g, lm, cf, remote="local"))
    r = rg.Graph()
    r.add(rg.Site("resid_post", layer=1, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="r")
    metric = (lambda logits: logits[:, 5])
    here, there = (rg.subspace.effects(r, "r", lm, ["ab", "cd"], metric=metric, remote=remote)
                   for remote in (None, "local"))
    assert here.equals(there) and here["effect"].abs().max() > 0
    assert rg.subspace.project(r, "r", lm, ["ab", "cd"]).equals(rg.subspace.project(r, "r", lm, ["ab", "cd"],
                                                                                    remote="local"))
    assert len(server_without_reftgraph) == 1 + 1 + 1 + 1   # predict, iia, effects: one session each; project


def test_generation_steers_remotely_as_here():
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="all"), rg.Add(50 * torch.randn(32, generator=torch.Generator()
                                                                                   .manual_seed(0))))
    here = g.generate(lm, ["ab", "cde"], max_new_tokens=5)
    there = g.generate(lm, ["ab", "cde"], max_new_tokens=5, remote="local")
    assert torch.equal(here.ids, there.ids) and not torch.equal(here.ids, rg.Graph().generate(
        lm, ["ab", "cde"], max_new_tokens=5).ids)


class Locked(rg.Op):
    """A custom op that holds a lock: it cannot be serialised."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def forward(self, h, source=None, valid=None):
        return h


def test_an_op_that_cannot_be_sent_is_refused_before_sending(server_without_reftgraph):
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0), rg.Add(torch.zeros(32)), name="fine")
    g.add(rg.Site("resid_post", layer=1), Locked(), name="locked")
    with pytest.raises(rg.SiteError, match=r"node 'locked' at resid_post\[1\].*cannot be sent.*lock"):
        g.run(lm, ["ab"], remote="local")
    with pytest.raises(rg.SiteError, match="node 'locked'"):
        g.generate(lm, ["ab"], remote="local")
    assert server_without_reftgraph == []


def test_ndif_needs_a_hub_id_a_key_and_an_answering_host(monkeypatch):
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    with pytest.raises(rg.RemoteError, match="needs the model's Hugging Face id"):
        g.run(lm, ["ab"], remote=True)
    monkeypatch.setattr(lm.nn, "repo_id", "meta-llama/Llama-3.1-8B")
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(rg.engine.remote, "api_key", lambda: None)
    with pytest.raises(rg.RemoteError, match="needs an API key.*NDIF_API_KEY.*nnsight.CONFIG.API.APIKEY"):
        g.run(lm, ["ab"], remote=True)
    monkeypatch.setattr(rg.engine.remote, "api_key", lambda: "a-key")
    for call in (lambda: g.run(lm, ["ab"], remote="http://127.0.0.1:9"),
                 lambda: rg.patching.sweep(lm, data(), "mlp_out", remote="http://127.0.0.1:9"),
                 lambda: g.generate(lm, ["ab"], remote="http://127.0.0.1:9")):
        with pytest.raises(rg.RemoteError, match=r"cannot reach the NDIF server at http://127.0.0.1:9.*nothing was sent"):
            call()
    # no hang on a host that never answers: the connection attempt carries the timeout
    asked = []

    def silent(address, timeout):
        asked.append((address, timeout))
        raise TimeoutError("timed out")
    monkeypatch.setattr(rg.engine.remote.socket, "create_connection", silent)
    with pytest.raises(rg.RemoteError, match=r"cannot reach the NDIF server at https://10.255.255.1.*TimeoutError"):
        g.run(lm, ["ab"], remote="https://10.255.255.1")
    assert asked == [(("10.255.255.1", 443), rg.engine.remote.CONNECT_TIMEOUT_S)]


def test_bad_remote_values_and_gradients():
    lm = rg.models.tiny("llama")
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
    with pytest.raises(rg.RemoteError, match="remote must be None, False, True"):
        g.run(lm, ["ab"], remote=1)
    with pytest.raises(rg.RemoteError, match="gradients do not come back"):
        g.run(lm, ["ab"], remote="local", grad=True)


def test_the_simulated_server_really_lacks_reftgraph(monkeypatch):
    """The control: a request that does not carry reftgraph's code fails to deserialise."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    monkeypatch.setattr(rg.engine.remote, "_ship_reftgraph", lambda: None)
    monkeypatch.setattr("cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES",
                        _PICKLE_BY_VALUE_MODULES - {"reftgraph"})
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="x")
    with pytest.raises(ModuleNotFoundError, match="reftgraph"):
        g.run(rg.models.tiny("llama"), ["ab"], remote="local")
