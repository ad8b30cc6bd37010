"""Teach a writing style with a LoReFT graph and measure what the model keeps (the demo's job).

>>> sorted(STYLES), style_pairs("title")[0][0]
(['caps', 'title'], ('What is the capital of France?', 'The Capital Of France Is Paris.'))

The training rows are the model's own answers to 90 shipped questions
(:func:`reftgraph.datasets.answers`) rewritten in a style: ``"caps"`` (ALL CAPITALS) or
``"title"`` (Every Word Capitalised). Training on them teaches the style, not new facts.
Two measures: the share of 30 held-out answers in the style, and *content kept*: of the
capital-city questions the model answers right before training (none about a country in
the training rows), the share still right after (the answer anywhere, any case).

The recipe (figures in ``docs/reft.md``, *Keeping content*): Title Case, a rank-4 LoReFT
graph at layers 10 and 16 on the first 5 and last 5 prompt tokens, and a KL term that keeps
the edited model's next-token distributions close to the unedited model's on neutral facts
(40 general-knowledge questions, :func:`reftgraph.datasets.facts`, with the model's own
answers rewritten in the style), case-folded so that the change of case costs nothing:
``rg.train(..., kl_weight=1.0, kl_data=styled_facts, kl_groups="case")``.

What keeps the content is the choice of style: a Title-Cased word is mostly the token the
model would have written (10% more tokens than the plain answers), an upper-cased one is
other, rarer tokens (87% more: "BERLIN" is not "Berlin"), and a 135M model cannot spell
what it knows in them, even when its answer is started for it in capitals. The KL term
holds the divergence on the facts it sees down (0.085 nats a token at the last step with
weight 1, 0.036 with weight 3, 0.012 with weight 10) but moves the capital-city measure
by less than its seed-to-seed spread; weight 10 costs the style.
"""

from __future__ import annotations

import time
from typing import Sequence

from .. import datasets
from ..core.graph import Graph
from ..methods.reft import reft_graph
from ..training import data as training_data
from ..training.supervised import train

__all__ = ["STYLES", "style_experiment", "style_pairs"]

STYLES = {"caps": (str.upper, datasets.is_caps), "title": (datasets.title_case, datasets.is_title)}


def style_pairs(style: str = "title", n_train: int = 90) -> tuple[list, list]:
    """The shipped answers in ``style``: ``(train, held_out)`` lists of ``(prompt, response)``.

    >>> train, held_out = style_pairs("title")
    >>> len(train), len(held_out), train[0][1]
    (90, 30, 'The Capital Of France Is Paris.')
    >>> style_pairs("caps")[0] == __import__("reftgraph").datasets.caps()[0]
    True
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    rewrite = STYLES[style][0]
    pairs = [(p, rewrite(r)) for p, r in datasets.answers()]
    return pairs[:n_train], pairs[n_train:]


def style_experiment(lm, layers: Sequence[int] = (10, 16), rank: int = 4, epochs: int = 6, lr: float = 6e-3,
                    examples: int = 90, new_tokens: int = 24, progress: bool = True, *, style: str = "title",
                    kl_weight: float = 1.0, kl_groups="case", positions: str = "f5+l5", questions: int = 30,
                    seed: int = 0, template="chat", kl_data=None, kl_facts: str = "styled") -> dict:
    """Train a LoReFT graph to answer in ``style``; measure the style on held-out questions and
    the content kept, before and after.

    >>> import reftgraph as rg
    >>> r = style_experiment(rg.models.tiny("llama"), layers=[1], epochs=1, examples=4, new_tokens=2,
    ...                     questions=2, template=None, progress=False)
    >>> r["style"], r["examples"], len(r["after"]), 0 <= r["kept"] <= 1, r["history"].columns[-1]
    ('title', 4, 2, True, 'kl')

    Returns ``graph, history, prompts, before, after`` (texts), ``rate_before``,
    ``rate_after`` (shares of ``prompts`` answered in the style), ``known`` (capital-city
    questions answered right before), ``kept`` (the share of those still right),
    ``facts_before``/``facts_after`` (those answers), ``train_seconds``, ``examples``,
    ``style`` and ``kl_weight``. ``kl_weight=0`` trains without the KL term (the old demo).
    ``kl_data``: the neutral ``(prompt, response)`` rows of the KL term (default
    :func:`reftgraph.datasets.facts`), rewritten in the style (``kl_facts="styled"``) or
    used as written (``"plain"``).
    ``template`` wraps prompts (``"chat"``: the model's chat template; None for a model without one).
    """
    if kl_facts not in ("styled", "plain", "rows"):
        raise ValueError(f"kl_facts must be 'styled', 'plain' or 'rows', got {kl_facts!r}")
    train_pairs, held_out = style_pairs(style)
    is_style = STYLES[style][1]
    prompts = [p for p, _ in held_out][:questions]
    gen = dict(max_new_tokens=new_tokens, template=template)
    before = Graph().generate(lm, prompts, **gen).texts
    facts = datasets.capital_questions()
    known = [(q, a) for (q, a), t in zip(facts, Graph().generate(lm, [q for q, _ in facts], **gen).texts)
             if datasets.answered(t, a)]
    g = reft_graph(lm, layers=list(layers), positions=positions, rank=rank)
    data = training_data.PromptResponse(train_pairs[:examples], template=template)
    rewrite = STYLES[style][0] if kl_facts == "styled" else (lambda text: text)
    kl_data = None if kl_facts == "rows" else [(q, rewrite(a)) for q, a in (kl_data or datasets.facts())]
    kl = dict(kl_weight=kl_weight, kl_data=kl_data, kl_groups=kl_groups) if kl_weight else {}
    t = time.time()
    history = train(g, lm, data, epochs=epochs, batch_size=8, lr=lr, seed=seed, progress=progress, **kl)
    seconds = time.time() - t
    after = g.generate(lm, prompts, **gen).texts
    facts_after = g.generate(lm, [q for q, _ in known], **gen).texts if known else []
    kept = sum(datasets.answered(t, a) for (_, a), t in zip(known, facts_after))
    return {"graph": g, "history": history, "prompts": prompts, "before": before, "after": after,
            "known": len(known), "kept": kept / max(1, len(known)), "facts": known, "facts_after": facts_after,
            "rate_before": sum(map(is_style, before)) / len(prompts),
            "rate_after": sum(map(is_style, after)) / len(prompts),
            "train_seconds": seconds, "examples": len(data), "style": style, "kl_weight": kl_weight}
