"""Vision-language models: the text tower of a tiny Gemma 3 (multimodal) wrapped and proven, run
on model inputs with images built from random pixels; ``positions="image"`` selects the image
tokens. Checked against plain PyTorch hooks on the text tower's blocks, outputs and gradients,
both padding sides."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

import reftgraph as rg
from reftgraph.arch.proofs import randomise_zero_maps
from reftgraph.arch.shrink import tiny_config_of

ATOL = 1e-5
LAYER = 1


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(tiny_config_of("gemma3"), dtype=torch.float32)
    randomise_zero_maps(hf)     # (its image projection starts at zero: every image would look alike)
    return rg.wrap(hf, rg.models.tiny_tokenizer(), name="tiny-gemma3-vlm")


def inputs(vlm, side="right", rows=((5, 6), (7, 8, 9, 10))):
    """Model inputs of rows ``text ids + image tokens + 2 text ids``, padded on ``side``, and random pixels."""
    config = vlm.hf.config
    image = [config.image_token_id] * config.mm_tokens_per_image
    seqs = [list(r) + image + [11, 12] for r in rows]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        at = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, at], mask[i, at] = torch.tensor(s), 1
    size = config.vision_config.image_size
    pixels = torch.randn(len(seqs), 3, size, size, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def plain(vlm, given, hooks=()):
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        return vlm.hf(**vlm.arch.inputs(given["input_ids"], given["attention_mask"]),
                      pixel_values=given["pixel_values"]).logits
    finally:
        for h in handles:
            h.remove()


def test_the_text_tower_is_found_and_every_block_component_proven(vlm):
    assert vlm.arch.family.layers == "model.language_model.layers" and vlm.arch.blocks[0].style == "post_norm"
    for c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "q", "k", "v"):
        assert vlm.arch.refusal(c, LAYER) is None, c


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_empty_graph_with_images_runs_the_model_as_it_runs_itself(vlm, side):
    given = inputs(vlm, side)
    out = rg.Graph().run(vlm, given)
    with torch.no_grad():
        want = plain(vlm, given)
    torch.testing.assert_close(out.logits, want, atol=ATOL, rtol=0)
    blank = dict(given, pixel_values=torch.zeros_like(given["pixel_values"]))
    assert not torch.allclose(rg.Graph().run(vlm, blank).logits, out.logits, atol=1e-4)   # the pixels matter


@pytest.mark.parametrize("side", ["left", "right"])
def test_image_positions_are_the_image_tokens(vlm, side):
    given = inputs(vlm, side)
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=LAYER, positions="image"), rg.Collect(), name="img")
    g.add(rg.Site("resid_pre", layer=LAYER, positions="all"), rg.Collect(), name="all")
    out = g.run(vlm, given)
    n = vlm.hf.config.mm_tokens_per_image
    assert out["img"].shape[:2] == (2, n)
    for row, first in enumerate((2, 4)):        # each row's text ids come first
        torch.testing.assert_close(out["img"][row], out["all"][row, first:first + n], atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_add_at_image_tokens_equals_the_plain_hook_outputs_and_gradients(vlm, side):
    given = inputs(vlm, side)
    vector = torch.randn(vlm.arch.d_model, generator=torch.Generator().manual_seed(2))
    op = rg.Add(vector.clone(), trainable=True)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=LAYER, positions="image"), op, name="a")
    ours = g.run(vlm, given).logits
    (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])
    v = vector.clone().requires_grad_(True)
    image = given["input_ids"] == vlm.hf.config.image_token_id

    def edit(module, args, out):
        t = (out[0] if isinstance(out, tuple) else out).clone()
        t[image] = t[image] + v
        return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
    want = plain(vlm, given, [(vlm.hf.model.language_model.layers[LAYER], edit)])
    (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-3, rtol=1e-4)


def test_loreft_on_image_tokens_trains(vlm):
    given = inputs(vlm)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="image"), rg.LoReFT(vlm.arch.d_model, rank=4), name="r")
    target = torch.tensor([3, 4])
    opt = torch.optim.AdamW(g.parameters(), lr=5e-2)
    losses = []
    for _ in range(25):
        logits = g.run(vlm, given).next_token_logits
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses     # (the image reaches the last token through attention alone)


def test_image_positions_without_image_tokens_are_refused_before_the_forward(vlm):
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=LAYER, positions="image"), rg.Collect(), name="img")
    with pytest.raises(rg.SiteError, match="positions='image'.*hold none"):
        g.run(vlm, ["a text without an image"])
    given = inputs(vlm)
    given["input_ids"][1] = 5       # the second row loses its image tokens
    with pytest.raises(rg.SiteError, match="row 1 has no image token"):
        g.run(vlm, given)


def test_generation_about_images_equals_hf_generate_with_the_plain_hooks(vlm):
    given = inputs(vlm, "left")
    v = 20 * torch.randn(vlm.arch.d_model, generator=torch.Generator().manual_seed(2))
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="image"), rg.Add(v), name="img")
    g.add(rg.Site("resid_post", layer=LAYER, positions="generated"), rg.Add(v), name="steer")
    got = g.generate(vlm, given, max_new_tokens=3)

    blocks = vlm.hf.model.language_model.layers
    image = (given["input_ids"] == vlm.hf.config.image_token_id)
    calls = {"img": 0, "steer": 0}

    def on_image(module, args, out):        # the prompt pass only: later passes see one new token
        calls["img"] += 1
        if calls["img"] > 1:
            return None
        x = out[0] if isinstance(out, tuple) else out
        x = torch.where(image[..., None], x + v, x)
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    def steer(module, args, out):           # each new token after the first
        calls["steer"] += 1
        if calls["steer"] == 1:
            return None
        x = (out[0] if isinstance(out, tuple) else out).clone()
        x[:, -1] += v
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    handles = [blocks[0].register_forward_hook(on_image), blocks[LAYER].register_forward_hook(steer)]
    try:
        want = vlm.hf.generate(**given, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(got.ids, want)
    assert not torch.equal(got.ids, rg.Graph().generate(vlm, given, max_new_tokens=3).ids)
    with pytest.raises(rg.DataError, match="pad the model inputs on the left"):
        g.generate(vlm, inputs(vlm, "right"), max_new_tokens=2)
