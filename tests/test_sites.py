"""Site: construction, printing, JSON round trip; position selectors resolved per row."""

import json

import pytest
import torch

import reftgraph as rg
from reftgraph.core.sites import resolve_positions

# Three rows with prompts of 5, 2 and 3 tokens in a batch padded to 5 tokens.
LENGTH = torch.tensor([5, 2, 3])
LEFT_START = torch.tensor([0, 3, 2])   # left padding: the prompt ends at the last column
RIGHT_START = torch.tensor([0, 0, 0])  # right padding: the prompt starts at column 0
SEQ_LEN = 5


def picked(sel):
    """The padded indices of the valid slots, row by row."""
    return [[i for i, ok in zip(idx, val) if ok] for idx, val in zip(sel.index.tolist(), sel.valid.tolist())]


def check_indices_in_range(sel):
    """Invalid slots must still point inside the batch, so gathering them is safe."""
    assert int(sel.index.min()) >= 0 and int(sel.index.max()) < SEQ_LEN


# -- construction and printing ------------------------------------------------

@pytest.mark.parametrize("site, text", [
    (rg.Site("resid_post", layer=9, positions=[0, 2]), "resid_post[9] pos=[0,2]"),
    (rg.Site("resid_post", layer=9, positions=3), "resid_post[9] pos=[3]"),
    (rg.Site("resid_pre", layer=-1, positions=[-1, -2]), "resid_pre[-1] pos=[-1,-2]"),
    (rg.Site("mlp_out", layer=0, positions=slice(1, -1)), "mlp_out[0] pos=[1:-1]"),
    (rg.Site("mlp_out", layer=0, positions=slice(None, 3)), "mlp_out[0] pos=[:3]"),
    (rg.Site("mlp_out", layer=0, positions=slice(0, 10, 2)), "mlp_out[0] pos=[0:10:2]"),
    (rg.Site("attn_out", layer=2, positions="last"), "attn_out[2] pos=last"),
    (rg.Site("resid_post", layer=9, positions="f5+l5"), "resid_post[9] pos=f5+l5"),
    (rg.Site("resid_mid", layer=1, positions="prompt"), "resid_mid[1] pos=prompt"),
    (rg.Site("mlp_act", layer=1), "mlp_act[1] pos=all"),
    (rg.Site("resid_post", layer=1, positions="generated"), "resid_post[1] pos=generated"),
    (rg.Site("head_out", layer=7, head=8, positions=[0]), "head_out[7].h8 pos=[0]"),
    (rg.Site("q", layer=0, head=(1, 3), positions="last"), "q[0].h1+h3 pos=last"),
    (rg.Site("resid_post", layer=9, positions="f5+l5", subspace=(0, 1)), "resid_post[9] pos=f5+l5 dims=[0,1]"),
    (rg.Site("v", layer=1, head=0, positions=-1, subspace=(2, 5)), "v[1].h0 pos=[-1] dims=[2,5]"),
])
def test_str_and_json_round_trip(site, text):
    assert str(site) == text
    again = rg.Site.from_dict(json.loads(json.dumps(site.to_dict())))
    assert again == site
    assert str(again) == text


def test_fields_are_normalised():
    site = rg.Site("head_out", layer=1, positions=4, head=2, subspace=3)
    assert site.positions == (4,)
    assert site.head == (2,)
    assert site.subspace == (3,)
    assert rg.Site("resid_post", 0, positions=[1, 2]).positions == (1, 2)
    assert rg.Site("k", 0, head=[0, 1]).head == (0, 1)


def test_site_is_frozen_and_replace_makes_a_copy():
    site = rg.Site("resid_post", layer=1, positions="last")
    with pytest.raises(AttributeError):
        site.layer = 2
    moved = site.replace(layer=0, positions=[1])
    assert (site.layer, site.positions) == (1, "last")
    assert (moved.layer, moved.positions, moved.component) == (0, (1,), "resid_post")


def test_to_dict_is_plain_json():
    d = rg.Site("q", layer=0, head=(1, 3), positions=slice(-3, None), subspace=(0,)).to_dict()
    assert d == {"component": "q", "layer": 0, "positions": {"slice": [-3, None, None]},
                 "head": [1, 3], "subspace": [0]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(component="resid_post", layer=1.0), "layer must be an int"),
    (dict(component="resid_post", layer=True), "layer must be an int"),
    (dict(component="q", layer=0, head=(1, 1)), "distinct"),
    (dict(component="resid_post", layer=0, subspace=(-1,)), "non-negative"),
    (dict(component="resid_post", layer=0, subspace=(2, 2)), "distinct"),
    (dict(component="resid_post", layer=0, subspace=()), "subspace"),
    (dict(component="resid_post", layer=0, positions=[]), "non-empty list of ints"),
    (dict(component="resid_post", layer=0, positions=[1, 1]), "repeat"),
    (dict(component="resid_post", layer=0, positions=True), "positions must be"),
    (dict(component="resid_post", layer=0, positions=slice(0, 4, -1)), "positive step"),
    (dict(component="resid_post", layer=0, positions=2.5), "positions must be"),
])
def test_malformed_fields_raise(kwargs, message):
    with pytest.raises(rg.SiteError, match=message):
        rg.Site(**kwargs)


@pytest.mark.parametrize("component, hint", [
    ("resid_psot", "did you mean 'resid_post'? "),
    ("Resid_Post", "did you mean 'resid_post'? "),
    ("mlp", "did you mean 'mlp_out', 'mlp_act' or 'mlp_in'? "),
    ("resid", "did you mean 'resid_pre', 'resid_mid' or 'resid_post'? "),
    ("logit", "did you mean 'logits'? "),
    (3, ""),
])
def test_an_unknown_component_names_the_nearest(component, hint):
    with pytest.raises(rg.SiteError) as err:
        rg.Site(component, layer=0)
    assert str(err.value) == (f"unknown component {component!r}; {hint}valid components: resid_pre, resid_mid, "
                              "resid_post, attn_out, cross_attn_out, mlp_out, mlp_act, head_out, q, k, v, attn_pattern, "
                              "q_in, k_in, v_in, mlp_in, mixer_out, embed, logits_in, logits")


# -- resolve_positions --------------------------------------------------------

@pytest.mark.parametrize("positions, left, right", [
    ((0, -1), [[0, 4], [3, 4], [2, 4]], [[0, 4], [0, 1], [0, 2]]),
    ((1,), [[1], [4], [3]], [[1], [1], [1]]),
    ((-2,), [[3], [3], [3]], [[3], [0], [1]]),
    ("last", [[4], [4], [4]], [[4], [1], [2]]),
    ("prompt", [[0, 1, 2, 3, 4], [3, 4], [2, 3, 4]], [[0, 1, 2, 3, 4], [0, 1], [0, 1, 2]]),
    ("all", [[0, 1, 2, 3, 4], [3, 4], [2, 3, 4]], [[0, 1, 2, 3, 4], [0, 1], [0, 1, 2]]),
    # first 2 and last 2: rows of 2 and 3 tokens must not repeat a position
    ("f2+l2", [[0, 1, 3, 4], [3, 4], [2, 3, 4]], [[0, 1, 3, 4], [0, 1], [0, 1, 2]]),
    ("f1+l0", [[0], [3], [2]], [[0], [0], [0]]),
    (slice(1, None), [[1, 2, 3, 4], [4], [3, 4]], [[1, 2, 3, 4], [1], [1, 2]]),
    (slice(-2, None), [[3, 4], [3, 4], [3, 4]], [[3, 4], [0, 1], [1, 2]]),
    (slice(None, -1), [[0, 1, 2, 3], [3], [2, 3]], [[0, 1, 2, 3], [0], [0, 1]]),
    (slice(-3, -1), [[2, 3], [3], [2, 3]], [[2, 3], [0], [0, 1]]),
    (slice(-10, 2), [[0, 1], [3, 4], [2, 3]], [[0, 1], [0, 1], [0, 1]]),
    (slice(0, None, 2), [[0, 2, 4], [3], [2, 4]], [[0, 2, 4], [0], [0, 2]]),
    (slice(3, None), [[3, 4], [], []], [[3, 4], [], []]),
])
def test_resolve_positions_left_and_right_padding(positions, left, right):
    site = rg.Site("resid_post", 0, positions=positions)  # normalises ints to tuples
    for start, expected in ((LEFT_START, left), (RIGHT_START, right)):
        sel = resolve_positions(site.positions, start, LENGTH)
        assert picked(sel) == expected
        assert sel.index.shape == sel.valid.shape and sel.index.shape[0] == 3
        check_indices_in_range(sel)


def test_f2_l2_valid_mask_layout():
    sel = resolve_positions("f2+l2", LEFT_START, LENGTH)
    # columns: first 0, first 1, last -2, last -1
    assert sel.valid.tolist() == [[True, True, True, True],
                                  [True, True, False, False],
                                  [True, True, False, True]]


def test_prompt_has_one_column_per_token_of_the_longest_row():
    sel = resolve_positions("prompt", LEFT_START, LENGTH)
    assert sel.valid.tolist() == [[True] * 5, [True, True, False, False, False], [True, True, True, False, False]]


@pytest.mark.parametrize("length, expected", [
    (1, [0]),
    (2, [0, 1]),
    (4, [0, 1, 2, 3]),
    (5, [0, 1, 2, 3, 4]),
    (6, [0, 1, 2, 3, 4, 5]),
    (7, [0, 1, 2, 4, 5, 6]),
    (9, [0, 1, 2, 6, 7, 8]),
])
def test_first_last_on_short_prompts_never_repeats(length, expected):
    sel = resolve_positions("f3+l3", torch.tensor([0]), torch.tensor([length]))
    assert picked(sel) == [expected]
    assert sel.index.shape[1] == 2 * min(3, length)   # no slot beyond the prompt is allocated
    wide = resolve_positions("f3+l3", torch.tensor([0]), torch.tensor([length]), cap=8)
    assert picked(wide) == [expected] and wide.index.shape[1] == 6   # in a batch 8 tokens wide


def test_first_last_allocates_in_proportion_to_the_prompt_not_to_n():
    sel = resolve_positions("f3000000000+l2000000000", torch.tensor([0, 1]), torch.tensor([3, 2]))
    assert sel.index.shape == (2, 6)
    assert picked(sel) == [[0, 1, 2], [1, 2]]


def test_a_huge_slice_step_reaches_one_position_without_overflow():
    sel = resolve_positions(slice(1, None, 2**62), torch.tensor([0]), torch.tensor([4]))
    assert picked(sel) == [[1]]


@pytest.mark.parametrize("positions", [[2**63], [-(2**70)], slice(0, 2**64), "f99999999999+l1"])
def test_positions_beyond_any_prompt_are_refused_when_the_site_is_made(positions):
    with pytest.raises(rg.SiteError, match="2147483647"):
        rg.Site("resid_pre", layer=0, positions=positions)


def test_first_last_rows_of_different_lengths_in_one_batch():
    length = torch.tensor([2, 7, 4])
    start = 7 - length  # left padded to 7 tokens
    sel = resolve_positions("f3+l3", start, length)
    rel = [[i - s for i in row] for row, s in zip(picked(sel), start.tolist())]
    assert rel == [[0, 1], [0, 1, 2, 4, 5, 6], [0, 1, 2, 3]]


@pytest.mark.parametrize("start", [LEFT_START, RIGHT_START])
def test_f0_l1_is_last(start):
    a = resolve_positions("f0+l1", start, LENGTH)
    b = resolve_positions("last", start, LENGTH)
    assert picked(a) == picked(b)
    assert a.valid.all()


@pytest.mark.parametrize("positions, row, tokens", [((2,), 1, 2), ((-3,), 1, 2), ((0, 4), 1, 2), ((5,), 0, 5)])
def test_explicit_positions_beyond_a_row_raise(positions, row, tokens):
    with pytest.raises(rg.SiteError, match=f"row {row} \\({tokens} tokens: valid positions 0..{tokens - 1} "
                                           f"or -{tokens}..-1\\)") as err:
        resolve_positions(positions, LEFT_START, LENGTH, where="node 'x' at resid_post[0]: ")
    assert str(err.value).startswith("node 'x' at resid_post[0]: ")


def test_generated_positions_only_during_generation():
    with pytest.raises(rg.SiteError, match="generated"):
        resolve_positions("generated", LEFT_START, LENGTH)


@pytest.mark.parametrize("positions", [
    [0, 2], -1, "last", "f5+l5", "prompt", "all",
    slice(1, -1),
])
def test_sites_are_hashable(positions):
    a = rg.Site("resid_post", 1, positions=positions, subspace=(0, 1))
    b = rg.Site.from_dict(json.loads(json.dumps(a.to_dict())))
    assert {a: 1}[b] == 1
