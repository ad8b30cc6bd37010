"""The causal-model helper: runs, interventions, counterfactual pairs, datasets."""

import itertools

import pytest

from reftgraph.causal import CausalModel

EQUALITY = {"a": None, "b": None, "c": None, "d": None,
            "wx": lambda a, b: a == b, "yz": lambda c, d: c == d, "out": lambda wx, yz: wx == yz}


def sample(rng):
    return {v: rng.randrange(3) for v in "abcd"}


def test_order_inputs_and_output():
    m = CausalModel({"out": lambda s: s % 2, "s": lambda x, y: x + y, "x": None, "y": None})
    assert m.inputs == ["x", "y"] and m.output == "out" and m.order.index("s") < m.order.index("out")
    assert m.run({"x": 2, "y": 3}) == {"x": 2, "y": 3, "s": 5, "out": 1}
    assert m.run({"x": 2, "y": 3}, {"s": 4})["out"] == 0


def test_interchange_matches_brute_force():
    """For every base/source over a small domain, interchanging wx (yz) equals recomputing
    the output with that equality taken from the source and the other from the base."""
    m = CausalModel(EQUALITY)
    domain = [dict(zip("abcd", v)) for v in itertools.product(range(2), repeat=4)]
    for base, source in itertools.product(domain, domain):
        wx_b, yz_b = base["a"] == base["b"], base["c"] == base["d"]
        wx_s, yz_s = source["a"] == source["b"], source["c"] == source["d"]
        assert m.interchange(base, source, ["wx"])["out"] == (wx_s == yz_b)
        assert m.interchange(base, source, ["yz"])["out"] == (wx_b == yz_s)
        assert m.interchange(base, source, ["wx", "yz"])["out"] == m.run(source)["out"]
        # interchanging an input is the same as editing the base's input
        assert m.interchange(base, source, ["a"]) == m.run(dict(base, a=source["a"]))


def test_pairs_cycle_types_and_labels():
    m = CausalModel(EQUALITY)
    pairs = m.pairs(sample, ["wx", "yz", ("wx", "yz")], 30, seed=1)
    assert [p.type for p in pairs[:3]] == ["wx", "yz", "wx+yz"] and len(pairs) == 30
    for p in pairs:
        assert p.label == m.interchange(p.base, p.source, p.variables)["out"]
        assert p.base_output == m.run(p.base)["out"]
    assert pairs == m.pairs(sample, ["wx", "yz", ("wx", "yz")], 30, seed=1)  # seeded
    changed = m.pairs(sample, ["wx"], 20, seed=2, changed_only=True)
    assert all(p.label != p.base_output for p in changed)


def test_dataset_for_language_models():
    m = CausalModel({"x": None, "y": None, "out": lambda x, y: x + y})
    pairs = m.pairs(lambda rng: {"x": rng.randrange(5), "y": rng.randrange(5)}, ["x"], 4, seed=0)
    data = m.dataset(pairs, prompt=lambda v: f"{v['x']}+{v['y']}=", answer=lambda n: f" {n}")
    p = pairs[0]
    assert data.base[0] == f"{p.base['x']}+{p.base['y']}=" and data.source[0] == f"{p.source['x']}+{p.source['y']}="
    assert data.correct[0] == f" {p.source['x'] + p.base['y']}" and data.wrong[0] == f" {p.base_output}"
    assert data.meta[0] == {"type": "x"} and len(data) == 4


def test_errors():
    with pytest.raises(ValueError, match="parent 'z' is not a variable"):
        CausalModel({"x": None, "y": lambda z: z})
    with pytest.raises(ValueError, match="cycle"):
        CausalModel({"x": lambda y: y, "y": lambda x: x})
    m = CausalModel(EQUALITY)
    with pytest.raises(ValueError, match=r"missing inputs \['d'\]"):
        m.run({"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match="variable 'q' is not a variable"):
        m.pairs(sample, ["q"], 2)
    with pytest.raises(ValueError, match="could not draw"):
        CausalModel({"x": None, "out": lambda x: 0}).pairs(lambda r: {"x": 1}, ["x"], 3, changed_only=True)
