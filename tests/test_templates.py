"""Every method that generates takes ``template=`` as ``rg.generate`` does (None, "chat" or a
function), and generates from the prompts as the template makes them."""

import pytest

import reftgraph as rg

CHAT = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


@pytest.fixture(scope="module")
def lm():
    model = rg.models.tiny("llama")
    model.tokenizer.chat_template = CHAT        # this test's own tokenizer
    return model


def steer(lm):
    return rg.steering.diffmean(lm, ["yes"], ["no"], rg.Site("resid_post", layer=0), scale=3.0, progress=False)


@pytest.mark.parametrize("template", ["chat", lambda p: f"Q: {p} A:"], ids=["chat", "function"])
def test_scale_sweep_generates_what_generate_does_with_the_template(lm, template):
    g = steer(lm)
    df = rg.steering.scale_sweep(lm, g, ["Hi", "So"], [0.0, 3.0], lambda t: "a" in t, max_new_tokens=4,
                                 template=template, progress=False)
    for scale, texts in zip(df["scale"], df["texts"]):
        g["steer"].op.scale = scale
        assert texts == g.generate(lm, ["Hi", "So"], max_new_tokens=4, template=template).texts
    assert df["rate"].tolist() == [sum("a" in t for t in texts) / 2 for texts in df["texts"]]


def test_scale_sweep_refuses_chat_without_a_chat_template_before_any_forward():
    lm = rg.models.tiny("llama")
    g = steer(lm)
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(rg.DataError, match="needs a chat template"):
            rg.steering.scale_sweep(lm, g, ["Hi"], [1.0], bool, template="chat", progress=False)
    finally:
        handle.remove()
    assert not calls


def test_memorise_trains_and_decodes_on_the_templated_prompt(lm):
    kw = dict(layer=0, max_steps=3, lr=0.1, progress=False)
    templated = rg.memorisation.memorise(lm, "ab", template=lambda p: f"<{p}>", **kw)
    by_hand = rg.memorisation.memorise(lm, "ab", prompt=f"<{rg.memorisation.DEFAULT_PROMPT}>", **kw)
    plain = rg.memorisation.memorise(lm, "ab", **kw)
    drop = (lambda row: {k: v for k, v in row.items() if k != "seconds"})
    assert drop(templated.row()) == drop(by_hand.row())
    assert templated.loss != plain.loss
    chat = rg.memorisation.memorise(lm, "ab", template="chat", **kw)
    assert chat.loss == rg.memorisation.memorise(
        lm, "ab", prompt=lm.tokenizer.apply_chat_template([{"role": "user", "content": rg.memorisation.DEFAULT_PROMPT}],
                                                          tokenize=False, add_generation_prompt=True), **kw).loss
